"""Decodes Confluent wire-format values the way a consumer would, independently of the
relay's encoder: the schema is fetched from the registry by the id in the value and read
with fastavro (Avro), protoc + the protobuf runtime (Protobuf), or json (JSON Schema).

stdin: one JSON object per line, {"value_b64": "..."}; argv[1]: the registry's URL.
stdout: one JSON object per line, {"schema_id": N, "type": "...", "value": ...}, or
{"error": "..."} for a value that cannot be decoded (the run goes on).
"""

import base64
import datetime
import decimal
import io
import json
import os
import sys
import tempfile
import urllib.request
import uuid

import fastavro
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

REGISTRY = sys.argv[1].rstrip("/")
_schemas = {}


def schema(schema_id):
    if schema_id not in _schemas:
        with urllib.request.urlopen(f"{REGISTRY}/schemas/ids/{schema_id}") as answer:
            _schemas[schema_id] = json.load(answer)
    return _schemas[schema_id]


def plain(value):
    """fastavro's Python values as JSON: what the application wrote."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    return value


def zigzag(buf):
    shift, result = 0, 0
    while True:
        byte = buf.read(1)[0]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1)
        shift += 7


_messages = {}


def proto_message(schema_id, text, path):
    key = (schema_id, tuple(path))
    if key in _messages:
        return _messages[key]
    from grpc_tools import protoc
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "schema.proto"), "w") as f:
            f.write(text)
        out = os.path.join(d, "set.pb")
        code = protoc.main(
            ["protoc", f"-I{d}", f"-I{include}", "--include_imports", f"--descriptor_set_out={out}", "schema.proto"]
        )
        if code != 0:
            raise ValueError(f"protoc failed on schema {schema_id}")
        files = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as f:
            files.ParseFromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    # The indexes count messages in declaration order: walk the FileDescriptorProto's
    # lists, which keep it, and look the full name up in the pool.
    (own,) = [f for f in files.file if f.name == "schema.proto"]
    proto, name = own.message_type[path[0]], own.package
    name = f"{name}.{proto.name}" if name else proto.name
    for i in path[1:]:
        proto = proto.nested_type[i]
        name = f"{name}.{proto.name}"
    desc = pool.FindMessageTypeByName(name)
    cls = message_factory.GetMessageClass(desc)
    _messages[key] = cls
    return cls


def decode(raw):
    buf = io.BytesIO(raw)
    if buf.read(1) != b"\x00":
        raise ValueError("no magic byte 0")
    schema_id = int.from_bytes(buf.read(4), "big")
    found = schema(schema_id)
    kind = found.get("schemaType", "AVRO")
    if kind == "AVRO":
        parsed = fastavro.parse_schema(json.loads(found["schema"]))
        value = plain(fastavro.schemaless_reader(buf, parsed))
        # fastavro stops where the schema ends: bytes after it mean the writer and the
        # registered schema disagree, which a reader would not notice but a test must.
        rest = len(buf.read())
        if rest:
            raise ValueError(f"{rest} bytes left after the Avro value")
    elif kind == "PROTOBUF":
        count = zigzag(buf)
        path = [zigzag(buf) for _ in range(count)] if count else [0]
        cls = proto_message(schema_id, found["schema"], path)
        msg = cls()
        msg.ParseFromString(buf.read())
        value = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    elif kind == "JSON":
        value = json.loads(buf.read())
    else:
        raise ValueError(f"unknown schemaType {kind}")
    return {"schema_id": schema_id, "type": kind, "value": value}


for line in sys.stdin:
    if not line.strip():
        continue
    try:
        answer = decode(base64.b64decode(json.loads(line)["value_b64"]))
    except Exception as e:  # one bad value must not hide the others
        answer = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(answer), flush=True)
