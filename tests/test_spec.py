"""Job files: good ones parse; malformed ones give one line naming file, line and field, exit code 2."""

import subprocess
import sys
import textwrap

import pytest

from farm.spec import SpecError, parse_spec

GOOD = """\
name: demo
inputs: [clips/*.mp4]
model:
  name: keyer
  params: {key: green}
window: {frames: 24, overlap: 8}
output:
  uri: out/{job}/{stem}_{channel}.{ext}
  channels: [alpha, comp]
resources: {actors: 2}
"""

# (yaml text, expected line, expected field path, words of the reason)
BAD = [
    (
        "name: x\ninputs: [a.mp4]\nwindow:\n  frames: 8\n  overlap: 16\n",
        5,
        "window.overlap",
        "less than half of window.frames",
    ),
    ("name: x\ninputs: [a.mp4]\nwindow:\n  frames: 24\n  overlap: 13\n", 5, "window.overlap", "less than half"),
    # the middle shards of 8/4 and 10/5 would render no frame of their own
    ("name: x\ninputs: [a.mp4]\nwindow:\n  frames: 8\n  overlap: 4\n", 5, "window.overlap", "no frame of its own"),
    ("name: x\ninputs: [a.mp4]\nwindow:\n  frames: 10\n  overlap: 5\n", 5, "window.overlap", "less than half"),
    # with the keyer's default overlap of 8, 16 frames leave the middle shards nothing
    ("name: x\ninputs: [a.mp4]\nwindow:\n  frames: 16\n", 4, "window.frames", "keyer's overlap of 8"),
    ("name: x\ninputs: [a.mp4]\nwindow:\n  overlap: 24\n", 4, "window.overlap", "keyer's 48"),
    ("name: x\ninputs: [a.mp4]\nmodel:\n  name: nope\n", 4, "model.name", "unknown model"),
    ("name: x\ninputs: [a.mp4]\noutput:\n  format: avi\n", 4, "output.format", "'avi'"),
    ("name: x\ninputs: [a.mp4]\nbogus: 1\n", 3, "bogus", "unknown key"),
    ("name: x\ninputs: [a.mp4]\nwindow:\n  frams: 8\n", 4, "window.frams", "unknown key"),
    ("inputs: [a.mp4]\n", 1, "name", "required"),
    ("name: x\ninputs: []\n", 2, "inputs", "at least 1"),
    (
        "name: x\ninputs: [a.mp4]\noutput:\n  channels: [alpha, fgr]\n  uri: o/{stem}.mp4\n",
        5,
        "output.uri",
        "{channel}",
    ),
    ("name: x\ninputs: [a.mp4]\nresources:\n  actors: 0\n", 4, "resources.actors", "greater than or equal to 1"),
    ("name: x\ninputs: [a.mp4]\noutput:\n  uri: o/{stem}_{foo}.mp4\n", 4, "output.uri", "unknown placeholder {foo}"),
    ("name: x\ninputs: [a.mp4]\nwindow:\n  frames: ten\n", 4, "window.frames", "valid integer"),
    ("name: x\ninputs: [a.mp4]\nwindow:\n  state: sideways\n", 4, "window.state", "'sideways'"),
    (
        "name: x\ninputs: [a.mp4]\noutput:\n  channels: [rgba]\n  format: mp4\n",
        4,
        "output.channels",
        "needs format mov",
    ),
    ("name: bad name!\ninputs: [a.mp4]\n", 1, "name", "pattern"),
    ("name: x\ninputs: [a.mp4]\nretries: -1\n", 3, "retries", "greater than or equal to 0"),
    ("name: x\ninputs: [a.mp4]\noutput:\n  uri: out/{job}.mp4\n", 4, "output.uri", "{stem}"),
]


def test_good_spec_parses():
    spec = parse_spec(GOOD, "good.yaml")
    assert spec.window.frames == 24 and spec.output.channels == ["alpha", "comp"]
    assert spec.job_id.startswith("demo-")


def test_job_id_ignores_credentials_and_resources():
    a = parse_spec(GOOD, "a.yaml")
    b = parse_spec(GOOD.replace("actors: 2", "actors: 5") + "storage_options: {key: AKIA, secret: s3cr3t}\n", "b.yaml")
    assert a.job_id == b.job_id
    assert "s3cr3t" not in str(b.public_dict())


@pytest.mark.parametrize("text,line,field,reason", BAD)
def test_bad_spec_names_line_and_field(text, line, field, reason):
    with pytest.raises(SpecError) as e:
        parse_spec(text, "jobs/bad.yaml")
    msg = str(e.value)
    assert msg.startswith(f"jobs/bad.yaml:{line} {field}: "), msg
    assert reason in msg and "\n" not in msg


def test_invalid_yaml_names_line():
    with pytest.raises(SpecError, match=r"^j.yaml:3: invalid YAML"):
        parse_spec("name: x\ninputs:\n  - [a.mp4\n", "j.yaml")


@pytest.mark.parametrize("text,line,field,reason", BAD[:10])
def test_cli_validate_exit_code_2_one_line(tmp_path, text, line, field, reason):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    p = subprocess.run([sys.executable, "-m", "farm.cli", "validate", str(job)], capture_output=True, text=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert f"job.yaml:{line} {field}:" in lines[0]


def test_cli_validate_missing_file(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "farm.cli", "validate", str(tmp_path / "nope.yaml")], capture_output=True, text=True
    )
    assert p.returncode == 2 and "no such job file" in p.stderr and "Traceback" not in p.stderr


def test_cli_validate_good(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(textwrap.dedent(GOOD))
    p = subprocess.run([sys.executable, "-m", "farm.cli", "validate", str(job)], capture_output=True, text=True)
    assert p.returncode == 0 and "ok" in p.stdout
