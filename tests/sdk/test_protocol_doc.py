"""docs/protocol.md against the code: its tables of close codes, error codes and limits must
say what ``voxlane.protocol`` and ``voxlane.errors`` do (the doc is what client authors read)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import voxlane.errors as errors
from voxlane.protocol import CloseCode, Limits, SessionConfig

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def _section(title: str) -> str:
    start = DOC.index(f"\n## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else None]


def _rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:]  # without the header row


def test_close_codes_table_matches_close_code_enum() -> None:
    documented = {int(row[0]) for row in _rows(_section("Close codes"))}
    assert documented == {int(code) for code in CloseCode}


def test_error_codes_table_matches_the_exception_tree() -> None:
    rows = _rows(_section("Errors"))
    assert rows, "no error table"
    for code_cell, class_cell, _ in rows:
        code, name = code_cell.strip("`"), class_cell.strip("`")
        assert errors.error_class_for_code(code).__name__ == name, code
    # Every code a server can send is documented (client-side-only codes excepted).
    client_only = {"connection_closed", "unauthorized", "invalid_token", "bad_model"}
    wire = {
        cls.code
        for cls in [errors.VoxlaneError, *errors._all_subclasses(errors.VoxlaneError)]
        if cls.code not in client_only
    }
    assert wire <= {row[0].strip("`") for row in rows}


def test_limits_table_defaults_match_limits() -> None:
    text = DOC[DOC.index("`limits` (defaults shown") :]
    rows = _rows(text[: text.index("\n\n", text.index("| limit"))])
    defaults = Limits()
    for name_cell, default_cell, _ in rows:
        name = name_cell.strip("`")
        value = getattr(defaults, name)
        number = default_cell.replace(",", "")
        if number.endswith("MiB"):
            assert value == int(number.split()[0]) * 1024 * 1024, name
        else:
            assert float(number) == value, name
    assert {r[0].strip("`") for r in rows} == set(Limits.model_fields)


def test_session_ready_example_parses_with_the_documented_defaults() -> None:
    block = re.search(r'```json\n(\{"type": "session.ready".*?)\n```', DOC, re.S)
    assert block is not None
    ready = json.loads(block.group(1).replace("5c0f…", "5c0f"))
    assert SessionConfig.model_validate(ready["config"]) == SessionConfig()
    assert Limits.model_validate(ready["limits"]) == Limits()
