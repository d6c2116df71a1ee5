"""The committed generated modules are exactly what `python -m moelens.protogen` writes."""

from __future__ import annotations

from pathlib import Path

from moelens.protogen import REPO_ROOT, generate


def test_generated_modules_are_fresh(tmp_path: Path):
    fresh = generate(tmp_path)
    assert fresh, "no proto files found"
    for path in fresh:
        committed = REPO_ROOT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} missing: run `make proto`"
        assert committed.read_text() == path.read_text(), f"{committed} stale: run `make proto`"


def test_every_proto_field_is_commented():
    for proto in sorted((REPO_ROOT / "proto" / "moelens" / "v1").glob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(
                ("syntax", "package", "option", "//"))
            if is_field:
                above = lines[i - 1].strip()
                grouped = above.endswith(";") and "=" in above  # a run of fields under one comment
                assert above.startswith("//") or grouped or "//" in line, f"{proto.name}:{i + 1}"
