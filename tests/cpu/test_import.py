"""CPU unit tier: import hygiene. The math package needs neither Megatron nor Transformer
Engine; the Megatron integration imports without TE."""

import subprocess
import sys


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_core_package_imports_without_megatron_and_te():
    r = run("import sys; sys.modules['megatron'] = None; sys.modules['transformer_engine'] = None\n"
            "import gqla_megatron, gqla_megatron.reference, gqla_megatron.reference_model, gqla_megatron.config\n"
            "print('ok')")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_megatron_integration_imports_without_te():
    r = run("import sys; sys.modules['transformer_engine'] = None\n"
            "import gqla_megatron.megatron as gm\n"
            "from gqla_megatron.megatron.spec import te_available\n"
            "assert not te_available(); spec = gm.get_gqla_layer_spec('local'); print('ok')")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_quickstart_runs_and_paths_agree():
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "quickstart_cpu.py"),
                        "--new-tokens", "6"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: both decode paths agree" in r.stdout
    assert "absorb = 28.125 % of it" in r.stdout
