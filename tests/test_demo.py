"""The README's main command: python -m chainrule demo."""

import re
import subprocess
import sys

import pytest


def _run(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "chainrule", *args], capture_output=True,
                          text=True, timeout=timeout)


def _accuracy(report, name):
    m = re.search(rf"^{re.escape(name)}\s+\d+\s+([\d.]+)\s+([\d.]+)", report, re.M)
    assert m, f"no row for {name!r} in the report"
    return float(m.group(2))


def test_demo_tells_the_lecture_story(tmp_path):
    proc = _run("demo", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # learn phi(x) instead of programming it
    assert _accuracy(out, "logistic regression on x") < 0.7
    assert _accuracy(out, "logistic regression on phi(x)") > 0.95
    assert _accuracy(out, "network, one tanh hidden layer") > 0.95
    # the chain of local Jacobians multiplies out to the network's Jacobian
    err = float(re.search(r"max \|chain product - jacobian\(model, x\)\| = (\S+)", out).group(1))
    assert err < 1e-12
    # vanishing gradient: sigmoid's first layer gets far less than ReLU's
    m = re.search(r"first/last layer: sigmoid (\S+), relu (\S+)", out)
    assert float(m.group(1)) < 1e-3 * float(m.group(2))
    if "skipping" not in out:
        acc = float(re.search(r"test accuracy ([\d.]+)", out).group(1))
        assert acc > 0.93
    pytest.importorskip("matplotlib")
    for name in ("decision_boundaries.png", "loss_curves.png", "gradient_norms.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_is_seeded():
    a, b = _run("demo", "--seed", "3"), _run("demo", "--seed", "3")
    strip = lambda s: re.sub(r"in [\d.]+ s", "", s)  # wall times differ
    assert a.returncode == 0 and strip(a.stdout) == strip(b.stdout)


def test_info_and_usage():
    proc = _run("info")
    assert proc.returncode == 0 and "kernels:" in proc.stdout and "OpenMP" in proc.stdout
    bad = _run("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr
