"""CI's strict mode (tests/required.py): skips tagged [required] fail under E5KIT_REQUIRE_SERVICES=1,
at collection (a module-level importorskip), in a fixture and in a test; untagged skips stay skips."""

from __future__ import annotations

from pathlib import Path

from helpers import run_python

CASES = '''
import pytest

@pytest.fixture
def service():
    pytest.skip("[required] the service is not installed")

def test_fixture(service):
    pass

def test_body():
    pytest.skip("[required] the tool is missing")

def test_plain():
    pytest.skip("an optional extra is missing")
'''


def _pytest(tmp_path: Path, strict: str):
    return run_python("-m", "pytest", "-p", "required", "-p", "no:cacheprovider", "-rA", "--continue-on-collection-errors",
                      str(tmp_path), cwd=tmp_path,
                      env={"PYTHONPATH": str(Path(__file__).parent), "E5KIT_REQUIRE_SERVICES": strict}, timeout=120)


def test_required_skips_fail_only_in_strict_mode(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES, encoding="utf-8")
    (tmp_path / "test_missing.py").write_text(
        'import pytest\npytest.importorskip("no_such_module_e5kit", reason="[required] no_such_module_e5kit")\n'
        "def test_never():\n    pass\n", encoding="utf-8")
    lenient = _pytest(tmp_path, "")
    assert lenient.returncode == 0, lenient.stdout
    assert "4 skipped" in lenient.stdout and "[required] the service is not installed" in lenient.stdout
    strict = _pytest(tmp_path, "1")
    assert strict.returncode == 1, strict.stdout
    assert "[required] no_such_module_e5kit (E5KIT_REQUIRE_SERVICES=1: not skipped)" in strict.stdout
    assert "ERROR test_cases.py::test_fixture" in strict.stdout and "FAILED test_cases.py::test_body" in strict.stdout
    assert "1 failed, 1 skipped, 2 errors" in strict.stdout
