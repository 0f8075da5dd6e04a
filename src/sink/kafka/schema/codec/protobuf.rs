//! Protobuf: a `.proto` compiled at run time (`protox`), the payload read as proto3's
//! canonical JSON mapping and encoded by `prost-reflect`.
//!
//! The Confluent wire format names the message within the file by its index path
//! (top-level index, then nested ones), written before the body; that list is fixed per
//! codec and written here.
//!
//! A file may import Google's well-known types (`google/protobuf/*.proto`, built into
//! `protox`); other imports would have to be registered as schema references, which the
//! relay does not do: they are refused when the file is compiled.

use prost::Message as _;
use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};

use super::{JsonPath, Violation};

/// The name the compiled file goes by inside the compiler.
const FILE_NAME: &str = "schema.proto";

pub struct ProtoCodec {
    text: String,
    message: MessageDescriptor,
    /// The message index list, already in its wire form.
    indexes: Vec<u8>,
}

/// The file being compiled, from memory: what the relay registers is exactly what it
/// compiled.
struct OneFile(String);

impl FileResolver for OneFile {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if name == FILE_NAME {
            File::from_source(name, &self.0)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

impl ProtoCodec {
    pub fn compile(text: &str, message: Option<&str>) -> Result<ProtoCodec, String> {
        let mut resolver = ChainFileResolver::new();
        resolver.add(OneFile(text.to_owned()));
        resolver.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler.open_file(FILE_NAME).map_err(|e| {
            let e = e.to_string().replace(FILE_NAME, "the file");
            if e.contains("not found") {
                format!(
                    "{e}: only google/protobuf/* imports are supported (others would be schema \
                     references); put the messages into one file"
                )
            } else {
                format!("not a valid .proto file: {e}")
            }
        })?;
        let pool = compiler.descriptor_pool();
        let file = pool
            .get_file_by_name(FILE_NAME)
            .ok_or("the compiled file is missing")?;
        let top: Vec<MessageDescriptor> = file.messages().collect();
        let chosen = match message {
            Some(name) => {
                // As written (`shop.Order`), else within the file's package (`Order`).
                let package = file.package_name();
                let ours = |full: &str| {
                    pool.get_message_by_name(full)
                        .filter(|m| m.parent_file().name() == FILE_NAME)
                };
                ours(name)
                    .or_else(|| {
                        (!package.is_empty()).then(|| ours(&format!("{package}.{name}")))?
                    })
                    .ok_or_else(|| {
                        format!(
                            "has no message {name:?} (it has {})",
                            all_names(&top).join(", ")
                        )
                    })?
            }
            None => match top.as_slice() {
                [only] => only.clone(),
                [] => return Err("defines no message".into()),
                _ => {
                    return Err(format!(
                        "defines several messages ({}): name one with message = \"…\"",
                        all_names(&top).join(", ")
                    ))
                }
            },
        };
        Ok(ProtoCodec {
            text: text.to_owned(),
            indexes: wire_indexes(&index_path(&chosen)),
            message: chosen,
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn record_name(&self) -> &str {
        self.message.full_name()
    }

    pub fn encode(&self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Vec<Violation>> {
        let mut de = serde_json::Deserializer::from_slice(payload);
        let mut track = serde_path_to_error::Track::new();
        let message = DynamicMessage::deserialize_with_options(
            self.message.clone(),
            serde_path_to_error::Deserializer::new(&mut de, &mut track),
            &DeserializeOptions::new(),
        )
        .and_then(|m| de.end().map(|()| m));
        let message = message.map_err(|e| {
            let mut at = JsonPath::root();
            for segment in track.path().iter() {
                at = match segment {
                    serde_path_to_error::Segment::Seq { index } => at.index(*index),
                    serde_path_to_error::Segment::Map { key } => at.key(key),
                    serde_path_to_error::Segment::Enum { variant } => at.key(variant),
                    serde_path_to_error::Segment::Unknown => at,
                };
            }
            // serde_json appends "at line L column C": the path says where.
            let text = e.to_string();
            let text = text.split(" at line ").next().unwrap_or(&text);
            vec![at.violation(text)]
        })?;
        out.extend_from_slice(&self.indexes);
        message
            .encode(out)
            .map_err(|e| vec![JsonPath::root().violation(format!("Protobuf: {e}"))])
    }
}

fn all_names(messages: &[MessageDescriptor]) -> Vec<String> {
    let mut names = Vec::new();
    for m in messages {
        names.push(m.full_name().to_owned());
        names.extend(all_names(&m.child_messages().collect::<Vec<_>>()));
    }
    names
}

/// Where `message` sits in its file: its top-level index, then each nested index.
fn index_path(message: &MessageDescriptor) -> Vec<i64> {
    let mut path = Vec::new();
    let mut current = message.clone();
    loop {
        match current.parent_message() {
            Some(parent) => {
                let i = parent
                    .child_messages()
                    .position(|m| m == current)
                    .unwrap_or(0);
                path.push(i as i64);
                current = parent;
            }
            None => {
                let i = current
                    .parent_file()
                    .messages()
                    .position(|m| m == current)
                    .unwrap_or(0);
                path.push(i as i64);
                break;
            }
        }
    }
    path.reverse();
    path
}

/// Confluent's message-index list: the count, then each index, as zig-zag varints; the
/// first message of the file (`[0]`) is written as a single 0.
pub(super) fn wire_indexes(path: &[i64]) -> Vec<u8> {
    let mut out = Vec::new();
    if path == [0] {
        out.push(0);
        return out;
    }
    zigzag(path.len() as i64, &mut out);
    for i in path {
        zigzag(*i, &mut out);
    }
    out
}

fn zigzag(n: i64, out: &mut Vec<u8>) {
    let mut v = ((n << 1) ^ (n >> 63)) as u64;
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}
