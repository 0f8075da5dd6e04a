use apache_avro::types::Value;

use super::*;

const ORDER_AVSC: &str = r#"{
  "type": "record", "name": "Order", "namespace": "shop",
  "fields": [
    {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
    {"name": "qty", "type": "int"},
    {"name": "note", "type": ["null", "string"], "default": null},
    {"name": "currency", "type": "string", "default": "EUR"},
    {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]}},
    {"name": "placed_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "day", "type": ["null", {"type": "int", "logicalType": "date"}], "default": null},
    {"name": "total", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
    {"name": "lines", "type": {"type": "array", "items": {
      "type": "record", "name": "Line", "fields": [{"name": "sku", "type": "string"}, {"name": "qty", "type": "int"}]}}},
    {"name": "attrs", "type": {"type": "map", "values": "long"}, "default": {}},
    {"name": "blob", "type": ["null", "bytes"], "default": null}
  ]
}"#;

fn avro(text: &str) -> Codec {
    Codec::compile(SchemaFormat::Avro, text, None).unwrap()
}

fn encode(codec: &Codec, json: &str) -> Result<Vec<u8>, Vec<Violation>> {
    let mut out = Vec::new();
    codec.encode(json.as_bytes(), &mut out).map(|()| out)
}

fn paths(violations: &[Violation]) -> Vec<&str> {
    violations.iter().map(|v| v.path.as_str()).collect()
}

/// Reads the datum back with the crate's reader (not the path that wrote it).
fn decode(bytes: &[u8]) -> Vec<(String, Value)> {
    let schema = apache_avro::Schema::parse_str(ORDER_AVSC).unwrap();
    #[allow(deprecated)]
    let value = apache_avro::from_avro_datum(&schema, &mut &bytes[..], None).unwrap();
    match value {
        Value::Record(fields) => fields,
        other => panic!("not a record: {other:?}"),
    }
}

#[test]
fn avro_reads_plain_json_as_the_schema_says() {
    let codec = avro(ORDER_AVSC);
    assert_eq!(codec.record_name(), Some("shop.Order"));
    let bytes = encode(
        &codec,
        r#"{"id": "9b2f4c1e-1111-4a2b-8c3d-000000000001", "qty": 3, "note": "gift",
            "status": "PAID", "placed_at": "2024-05-01T12:00:00+02:00", "day": "1970-01-11",
            "total": "-12.30", "lines": [{"sku": "a", "qty": 1}], "attrs": {"x": 5},
            "blob": "AAEC"}"#,
    )
    .unwrap();
    let fields = decode(&bytes);
    let get = |name: &str| fields.iter().find(|(n, _)| n == name).unwrap().1.clone();
    assert_eq!(get("qty"), Value::Int(3));
    assert_eq!(
        get("note"),
        Value::Union(1, Box::new(Value::String("gift".into())))
    );
    assert_eq!(get("currency"), Value::String("EUR".into()), "the default");
    assert_eq!(get("status"), Value::Enum(1, "PAID".into()));
    assert_eq!(get("placed_at"), Value::TimestampMillis(1_714_557_600_000));
    assert_eq!(get("day"), Value::Union(1, Box::new(Value::Date(10))));
    // -1230 in two's complement: 0xFB 0x32.
    assert_eq!(
        get("total"),
        Value::Decimal(apache_avro::Decimal::from(vec![0xfb, 0x32]))
    );
    assert_eq!(
        get("blob"),
        Value::Union(1, Box::new(Value::Bytes(vec![0, 1, 2])))
    );
}

#[test]
fn avro_takes_numbers_in_the_logical_types_unit_and_null_for_optional_fields() {
    let codec = avro(ORDER_AVSC);
    let bytes = encode(
        &codec,
        r#"{"id": "9b2f4c1e-1111-4a2b-8c3d-000000000001", "qty": 1, "note": null,
            "status": "NEW", "placed_at": 1714557600000, "day": 19844, "total": "5",
            "lines": []}"#,
    )
    .unwrap();
    let fields = decode(&bytes);
    let get = |name: &str| fields.iter().find(|(n, _)| n == name).unwrap().1.clone();
    assert_eq!(get("note"), Value::Union(0, Box::new(Value::Null)));
    assert_eq!(get("placed_at"), Value::TimestampMillis(1_714_557_600_000));
    assert_eq!(get("day"), Value::Union(1, Box::new(Value::Date(19844))));
    // 5.00 unscaled is 500 = 0x01F4.
    assert_eq!(
        get("total"),
        Value::Decimal(apache_avro::Decimal::from(vec![0x01, 0xf4]))
    );
}

#[test]
fn avro_names_every_violation_by_its_json_path() {
    let codec = avro(ORDER_AVSC);
    let v = encode(
        &codec,
        r#"{"id": "not-a-uuid", "qty": "three", "status": "LOST", "placed_at": "yesterday",
            "total": "1.234", "lines": [{"sku": "a", "qty": 1}, {"sku": 2, "qty": 1}],
            "extra": true}"#,
    )
    .unwrap_err();
    assert_eq!(
        paths(&v),
        [
            "$.id",
            "$.qty",
            "$.status",
            "$.placed_at",
            "$.total",
            "$.lines[1].sku",
            "$.extra"
        ],
        "{v:?}"
    );
    assert!(v[1].message.contains("expected an integer"), "{}", v[1]);
    assert!(v[2].message.contains("NEW, PAID"), "{}", v[2]);
    assert!(v[4].message.contains("scale is 2"), "{}", v[4]);
    assert!(
        v[6].message.contains("not a field of record shop.Order"),
        "{}",
        v[6]
    );

    let missing = encode(&avro(ORDER_AVSC), "{}").unwrap_err();
    assert!(missing
        .iter()
        .any(|v| v.path == "$.qty" && v.message.contains("missing")));
    assert!(missing.len() <= MAX_VIOLATIONS);
    for not_an_object in ["[]", "1", "\"x\"", "null", "not json"] {
        let v = encode(&codec, not_an_object).unwrap_err();
        assert_eq!(paths(&v), ["$"], "{not_an_object}: {v:?}");
    }
}

#[test]
fn avro_unions_take_the_first_branch_the_value_fits() {
    let codec = avro(
        r#"{"type": "record", "name": "U", "fields": [{"name": "v", "type": ["null", "long", "string"]}]}"#,
    );
    for (json, branch) in [
        (r#"{"v": null}"#, 0),
        (r#"{"v": 7}"#, 1),
        (r#"{"v": "x"}"#, 2),
    ] {
        let bytes = encode(&codec, json).unwrap();
        // The union's branch index is the first (zig-zag) varint of the record.
        assert_eq!(bytes[0], branch * 2, "{json}");
    }
    let v = encode(&codec, r#"{"v": true}"#).unwrap_err();
    assert!(
        v[0].message
            .contains("fits none of the union's types (null, long, string)"),
        "{v:?}"
    );
}

#[test]
fn decimals_are_checked_against_precision_and_scale() {
    let codec = avro(
        r#"{"type": "record", "name": "D", "fields": [{"name": "d", "type": {"type": "fixed", "name": "F", "size": 4, "logicalType": "decimal", "precision": 6, "scale": 1}}]}"#,
    );
    assert_eq!(
        encode(&codec, r#"{"d": "-0.1"}"#).unwrap(),
        [0xff, 0xff, 0xff, 0xff]
    );
    assert_eq!(encode(&codec, r#"{"d": "12.5"}"#).unwrap(), [0, 0, 0, 125]);
    for bad in ["1234567", "1.25", "1e3", "", "-", "1.2.3", "12 "] {
        let v = encode(&codec, &format!(r#"{{"d": "{bad}"}}"#)).unwrap_err();
        assert_eq!(paths(&v), ["$.d"], "{bad}");
    }
    assert!(
        encode(&codec, r#"{"d": 12.5}"#).is_err(),
        "a decimal is a string"
    );
}

#[test]
fn protobuf_message_indexes_follow_confluents_format() {
    use super::protobuf::wire_indexes;
    assert_eq!(wire_indexes(&[0]), [0]);
    assert_eq!(wire_indexes(&[1]), [2, 2]);
    assert_eq!(wire_indexes(&[1, 0]), [4, 2, 0]);
    assert_eq!(wire_indexes(&[0, 2]), [4, 0, 4]);
}

const SHOP_PROTO: &str = r#"
syntax = "proto3";
package shop;
import "google/protobuf/timestamp.proto";
message Customer { string name = 1; }
message Order {
  message Line { string sku = 1; int32 qty = 2; }
  string id = 1;
  repeated Line lines = 2;
  google.protobuf.Timestamp placed_at = 3;
  int64 total_cents = 4;
}
"#;

#[test]
fn protobuf_reads_proto3_json_and_writes_the_message_index_first() {
    use prost_reflect::DynamicMessage;
    let codec = Codec::compile(SchemaFormat::Protobuf, SHOP_PROTO, Some("Order.Line")).unwrap();
    assert_eq!(codec.record_name(), Some("shop.Order.Line"));
    let bytes = encode(&codec, r#"{"sku": "a", "qty": 2}"#).unwrap();
    assert_eq!(&bytes[..3], [4, 2, 0], "index path [1, 0]");

    let codec = Codec::compile(SchemaFormat::Protobuf, SHOP_PROTO, Some("shop.Order")).unwrap();
    let bytes = encode(
        &codec,
        r#"{"id": "o-1", "lines": [{"sku": "a", "qty": 2}], "placedAt": "2024-05-01T10:00:00Z", "totalCents": "1250"}"#,
    )
    .unwrap();
    assert_eq!(&bytes[..2], [2, 2], "index path [1]");
    // Decoded with a pool compiled apart from the codec's, from a file on disk.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shop.proto"), SHOP_PROTO).unwrap();
    let mut compiler = protox::Compiler::new([dir.path()]).unwrap();
    compiler.open_file("shop.proto").unwrap();
    let desc = compiler
        .descriptor_pool()
        .get_message_by_name("shop.Order")
        .unwrap();
    let message = DynamicMessage::decode(desc, &bytes[2..]).unwrap();
    let json = serde_json::to_value(&message).unwrap();
    assert_eq!(json["id"], "o-1");
    assert_eq!(json["lines"][0]["qty"], 2);
    assert_eq!(json["placedAt"], "2024-05-01T10:00:00Z");
    assert_eq!(json["totalCents"], "1250");
}

#[test]
fn protobuf_violations_name_the_field() {
    let codec = Codec::compile(SchemaFormat::Protobuf, SHOP_PROTO, Some("Order")).unwrap();
    let v = encode(
        &codec,
        r#"{"id": "o-1", "lines": [{"sku": "a"}, {"qty": "many"}]}"#,
    )
    .unwrap_err();
    assert_eq!(paths(&v), ["$.lines[1].qty"], "{v:?}");
    let v = encode(&codec, r#"{"id": "o-1", "nope": 1}"#).unwrap_err();
    assert!(v[0].message.contains("nope"), "{v:?}");
    assert!(encode(&codec, "[1]").is_err());
}

#[test]
fn proto_files_are_refused_clearly() {
    let several = Codec::compile(SchemaFormat::Protobuf, SHOP_PROTO, None).unwrap_err();
    assert!(several.contains("shop.Customer, shop.Order"), "{several}");
    let missing = Codec::compile(SchemaFormat::Protobuf, SHOP_PROTO, Some("Nope")).unwrap_err();
    assert!(missing.contains("no message \"Nope\""), "{missing}");
    let import = Codec::compile(
        SchemaFormat::Protobuf,
        "syntax = \"proto3\"; import \"other.proto\"; message A { string a = 1; }",
        None,
    )
    .unwrap_err();
    assert!(import.contains("one file"), "{import}");
    assert!(Codec::compile(SchemaFormat::Protobuf, "message {", None).is_err());
}

#[test]
fn json_schema_validates_and_passes_the_payload_through() {
    let codec = Codec::compile(
        SchemaFormat::JsonSchema,
        r#"{"title": "shop.Order", "type": "object", "required": ["id"],
            "properties": {"id": {"type": "string"},
                           "lines": {"type": "array", "items": {"type": "object",
                             "properties": {"qty": {"type": "integer"}}}}}}"#,
        None,
    )
    .unwrap();
    assert_eq!(codec.record_name(), Some("shop.Order"));
    let payload = r#"{"id": "o-1", "lines": [{"qty": 1}]}"#;
    assert_eq!(encode(&codec, payload).unwrap(), payload.as_bytes());
    let v = encode(
        &codec,
        r#"{"lines": [{"qty": 1}, {"qty": 1}, {"qty": "x"}]}"#,
    )
    .unwrap_err();
    let mut found = paths(&v);
    found.sort();
    assert_eq!(found, ["$", "$.lines[2].qty"], "{v:?}");
    assert!(Codec::compile(SchemaFormat::JsonSchema, r#"{"type": 5}"#, None).is_err());
    assert!(Codec::compile(SchemaFormat::JsonSchema, "not json", None).is_err());
}

#[test]
fn json_paths_quote_keys_that_are_not_plain() {
    let root = JsonPath::root();
    assert_eq!(root.key("a").index(2).key("b_c").0, "$.a[2].b_c");
    assert_eq!(root.key("a b").0, r#"$["a b"]"#);
    assert_eq!(root.key("").0, r#"$[""]"#);
}
