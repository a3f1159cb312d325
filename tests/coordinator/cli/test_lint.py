"""`lockstep lint` for CI: every file reported, distinct exit codes, JSON and SARIF, allows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from coordinator.cli import main

HAZARD = "ALTER TABLE users ALTER COLUMN id TYPE bigint;\n-- lockstep:rollback\n"
WARNING = "CREATE INDEX users_name_idx ON users (name);\n"
BROKEN = "ALTER TABLE users ADD COLUMN;\n"


def lint(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["lint", *args])
    return code, capsys.readouterr().out


def lint_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    code, out = lint(capsys, "--format", "json", *args)
    return code, json.loads(out)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_every_file_of_a_directory_is_reported_even_after_a_broken_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "1_broken.sql", BROKEN)
    write(tmp_path, "2_hazard.sql", HAZARD)
    write(tmp_path, "3_fine.sql", "ALTER TABLE users ADD COLUMN nick text;\n")
    code, report = lint_json(capsys, str(tmp_path))
    assert code == 3  # could not load wins over findings: the verdict is incomplete
    assert [f["migration"] for f in report["files"]] == ["2_hazard", "3_fine"]
    assert report["files"][0]["findings"][0]["rule"] == "LS105"
    (error,) = report["errors"]
    assert error["path"].endswith("1_broken.sql") and error["line"] == 1
    assert "syntax error: syntax error" not in error["message"]
    assert report["summary"] == {"files": 3, "errors": 1, "warnings": 0, "not_loaded": 1}


def test_exit_codes_tell_findings_from_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert lint(capsys, str(write(tmp_path, "a.sql", HAZARD)))[0] == 1
    code, out = lint(capsys, str(write(tmp_path, "b.sql", WARNING)))
    assert code == 0 and "LS201" in out and "safe migration:" in out
    assert "CREATE INDEX CONCURRENTLY users_name_idx ON users (name);" in out
    assert lint(capsys, str(tmp_path / "missing.sql"))[0] == 3


def test_sarif_for_code_scanning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "a.sql", "-- a comment\n" + HAZARD)
    code, out = lint(capsys, "--format", "sarif", str(path))
    sarif = json.loads(out)
    assert code == 1 and sarif["version"] == "2.1.0"
    (run,) = sarif["runs"]
    assert run["tool"]["driver"]["name"] == "lockstep"
    assert {r["id"] for r in run["tool"]["driver"]["rules"]} >= {"LS105", "LS201", "LS401"}
    (result,) = run["results"]
    assert result["ruleId"] == "LS105" and result["level"] == "error"
    location = result["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == str(path)
    assert location["region"]["startLine"] == 2
    assert run["invocations"][0]["executionSuccessful"] is True


def test_allow_markers_silence_one_rule_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    statement = write(tmp_path, "a.sql", "-- lockstep:allow LS105 users has 12 rows\n" + HAZARD)
    code, report = lint_json(capsys, str(statement))
    assert code == 0 and report["files"][0]["findings"] == []
    whole = write(tmp_path, "c.sql", HAZARD + "-- lockstep:allow-file LS105 a fresh table\n")
    assert lint(capsys, str(whole))[0] == 0
    other_rule = write(tmp_path, "d.sql", "-- lockstep:allow LS201 not this one\n" + HAZARD)
    assert lint(capsys, str(other_rule))[0] == 1
    no_reason = write(tmp_path, "e.sql", "-- lockstep:allow LS105\n" + HAZARD)
    code, out = lint(capsys, str(no_reason))
    assert code == 3 and "needs a reason" in out


def test_wrongly_cased_marker_and_bom_and_contract_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upper = write(tmp_path, "a.sql", "SELECT 1;\n-- LOCKSTEP:CONTRACT\nDROP TABLE t;\n")
    code, out = lint(capsys, str(upper))
    assert code == 3 and "-- lockstep:contract" in out
    bom = tmp_path / "b.sql"
    bom.write_bytes(b"\xef\xbb\xbfALTER TABLE users ADD COLUMN n text;\n")
    assert lint(capsys, str(bom))[0] == 0
    contract = write(tmp_path, "c.sql", "-- lockstep:contract\nALTER TABLE t DROP COLUMN c;\n")
    assert lint(capsys, str(contract))[0] == 0


def test_strict_profile_adds_style_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "a.sql", "CREATE TABLE t (id int PRIMARY KEY, data json);\n")
    assert lint_json(capsys, str(path))[1]["summary"]["warnings"] == 0
    code, report = lint_json(capsys, "--profile", "strict", str(path))
    assert code == 0
    assert sorted(f["rule"] for f in report["files"][0]["findings"]) == ["LS401", "LS406"]


def test_plan_shows_why_a_validate_runs_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        "a.sql",
        "ALTER TABLE orders ADD CONSTRAINT c CHECK (total > 0) NOT VALID;\n"
        "ALTER TABLE orders VALIDATE CONSTRAINT c;\n",
    )
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "group 2: autocommit" in out
    assert "ACCESS EXCLUSIVE lock on orders" in out
    assert "LINT: OK" in out
