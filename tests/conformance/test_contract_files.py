"""The contract files, checked by the ecosystem's own tools: the AsyncAPI document by the official
AsyncAPI parser (what code generators run first), every JSON Schema by its meta-schema."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest

from forseti.schemas.generate import ASYNCAPI, JSON_DIR

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def asyncapi_parser() -> list[str]:
    """The command that runs @asyncapi/parser, installed from tests/conformance/package-lock.json on
    first use (npm is on the build machines; `npm ci` fetches only from the package registry)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("Node.js and npm are needed to run the official AsyncAPI parser (apt-get install nodejs npm)")
    if not (HERE / "node_modules" / "@asyncapi" / "parser").is_dir():
        subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=HERE,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return [node, str(HERE / "validate_asyncapi.mjs")]


def test_the_asyncapi_document_has_no_errors_for_the_official_parser(asyncapi_parser: list[str]) -> None:
    """Parameterised channels (`forseti.llm.{name}.complete`) name their parameters as the parser
    expects; before, it found 4 errors and code generators refused the document."""
    run = subprocess.run([*asyncapi_parser, str(ASYNCAPI)], capture_output=True, text=True, timeout=120)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["errors"] == [], report["errors"]
    assert run.returncode == 0, run.stderr


def test_the_parser_check_catches_an_invalid_document(asyncapi_parser: list[str], tmp_path: Path) -> None:
    """The check itself can fail: a channel whose parameter is misnamed is reported."""
    broken = ASYNCAPI.read_text().replace("      name:\n", "      name}.complete:\n", 1)
    assert broken != ASYNCAPI.read_text()
    (tmp_path / "asyncapi.yaml").write_text(broken)
    shutil.copytree(JSON_DIR, tmp_path / "json")
    run = subprocess.run(
        [*asyncapi_parser, str(tmp_path / "asyncapi.yaml")], capture_output=True, text=True, timeout=120
    )
    codes = {e["code"] for e in json.loads(run.stdout.strip().splitlines()[-1])["errors"]}
    assert run.returncode == 1
    assert "asyncapi3-channel-parameters" in codes


@pytest.mark.parametrize("path", sorted(JSON_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_json_schema_is_valid_against_its_meta_schema(path: Path) -> None:
    """Each file under schemas/json/ is a valid draft 2020-12 schema (what validators in every language load)."""
    schema = json.loads(path.read_text())
    validator = jsonschema.validators.validator_for(schema)
    assert validator is jsonschema.Draft202012Validator
    validator.check_schema(schema)
