"""Write (or check) the JSON Schema of every event and the AsyncAPI 3.0 document.

python -m forseti.schemas.generate          # rewrite schemas/json/*.json and schemas/asyncapi.yaml
python -m forseti.schemas.generate --check  # exit 1 when the files on disk are stale
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml

from .catalog import all_specs
from .envelope import Envelope

HERE = Path(__file__).parent
JSON_DIR = HERE / "json"
ASYNCAPI = HERE / "asyncapi.yaml"


def event_schema(event_type: str) -> dict[str, Any]:
    """The JSON Schema of a whole CloudEvent of one type, with `data` typed."""
    spec = next(s for s in all_specs() if s.type == event_type)
    envelope = Envelope.model_json_schema(by_alias=True)
    data = spec.model.model_json_schema(by_alias=True)
    defs = {**data.pop("$defs", {})}
    envelope["properties"]["type"] = {"const": spec.type, "description": "Event type."}
    envelope["properties"]["data"] = data
    envelope["title"] = spec.type
    envelope["description"] = spec.summary
    if defs:
        envelope["$defs"] = defs
    envelope["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    envelope["$id"] = f"https://forseti.dev/schemas/{spec.type}.json"
    return envelope


PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
"""A parameter in a channel address: `forseti.llm.{name}.complete` has `name`."""


def _parameter_description(address: str, name: str) -> str:
    what = f"The {name.replace('_', ' ')}"
    # Kafka keys a channel by its trailing id (channels.py); an id in the middle is part of the topic
    return f"{what}; the Kafka message key." if address.endswith(f"{{{name}}}") else f"{what}, part of the topic."


def _channel_key(address: str) -> str:
    return address.replace("forseti.", "").replace(".{", "_").replace("}", "").replace(".", "_")


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document: every channel, message and operation."""
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for spec in all_specs():
        key = _channel_key(spec.channel)
        msg_key = spec.type.removeprefix("forseti.").replace(".", "_")
        messages[msg_key] = {
            "name": spec.type,
            "summary": spec.summary,
            "contentType": "application/cloudevents+json",
            "payload": {"$ref": f"./json/{spec.type}.json"},
        }
        channel = channels.setdefault(key, {"address": spec.channel, "messages": {}})
        channel["messages"][msg_key] = {"$ref": f"#/components/messages/{msg_key}"}
        names = PARAMETER.findall(spec.channel)
        if names:
            channel["parameters"] = {
                name: {"description": _parameter_description(spec.channel, name)} for name in names
            }
    operations = {
        f"receive_{key}": {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/{m}"} for m in channel["messages"]],
        }
        for key, channel in channels.items()
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Forseti",
            "version": "1.0.0",
            "description": "Event-driven ML / RL worker. Every message is a CloudEvents 1.0 event in JSON "
            "structured mode. Kafka uses a channel without its trailing {id} as the topic "
            "and the id as the message key.",
        },
        "defaultContentType": "application/cloudevents+json",
        "servers": {
            "nats": {"host": "localhost:4222", "protocol": "nats"},
            "kafka": {"host": "localhost:9092", "protocol": "kafka"},
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def rendered() -> dict[Path, bytes]:
    """Every generated file and its content."""
    files = {
        JSON_DIR / f"{spec.type}.json": orjson.dumps(event_schema(spec.type), option=orjson.OPT_INDENT_2) + b"\n"
        for spec in all_specs()
    }
    files[ASYNCAPI] = yaml.safe_dump(asyncapi(), sort_keys=False, width=100).encode()
    return files


def stale() -> list[Path]:
    """Generated files that are missing or differ from what the models say now."""
    expected = rendered()
    out = [path for path, content in expected.items() if not path.exists() or path.read_bytes() != content]
    out += [path for path in JSON_DIR.glob("*.json") if path not in expected]
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the files, or with --check report the stale ones."""
    args = sys.argv[1:] if argv is None else argv
    if "--check" in args:
        bad = stale()
        for path in bad:
            print(f"stale: {path.relative_to(HERE.parent)}", file=sys.stderr)
        if bad:
            print("run: python -m forseti.schemas.generate", file=sys.stderr)
        return 1 if bad else 0
    JSON_DIR.mkdir(exist_ok=True)
    for path in JSON_DIR.glob("*.json"):
        path.unlink()
    for path, content in rendered().items():
        path.write_bytes(content)
    print(f"wrote {len(rendered())} files under {HERE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
