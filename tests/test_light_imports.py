"""`import farm`, `farm validate` and `farm plan` load no torch or diffusers: model stacks load in actors."""

import subprocess
import sys

CODE = """
import sys
import farm, farm.cli, farm.spec, farm.plan, farm.driver
from actors import load_model_class, model_names
for name in model_names():
    load_model_class(name)
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "onnx") if m in sys.modules)
print(",".join(heavy) or "none")
"""


def test_core_and_model_classes_import_without_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "none"
