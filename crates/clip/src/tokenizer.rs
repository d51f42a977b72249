//! The CLIP tokenizer, as transformers' `CLIPTokenizer` (v5, backed by `tokenizers`) builds it:
//! see `models/clip/tokenization_clip.py` and `CLIPConverter` in `convert_slow_tokenizer.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::Tokenizer;
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// The CLIP BPE vocabulary (`vocab.json`) built into the binary: the one every SD1.x/SDXL
/// tokenizer folder holds.
pub const BUILTIN_VOCAB: &str = include_str!("../assets/vocab.json");
/// The CLIP BPE merges (`merges.txt`) built into the binary.
pub const BUILTIN_MERGES: &str = include_str!("../assets/merges.txt");

/// CLIP's pre-tokenization pattern: the two special tokens, English contractions, runs of letters,
/// single digits, and runs of anything else that is not whitespace.
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's context length, used only when `tokenizer_config.json` gives no usable
/// `model_max_length` (every published CLIP tokenizer config says 77).
const CLIP_CONTEXT_LENGTH: usize = 77;

/// `CLIPTokenizer`'s defaults for the special tokens a config may leave out.
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const DEFAULT_UNK: &str = "<|endoftext|>";
const DEFAULT_PAD: &str = "<|endoftext|>";

/// The special tokens and length a tokenizer folder's configs name.
#[derive(Debug, Clone, PartialEq)]
struct SpecialTokens {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    max_length: usize,
}

impl SpecialTokens {
    fn defaults(pad: &str, max_length: usize) -> Self {
        Self {
            bos: DEFAULT_BOS.to_string(),
            eos: DEFAULT_EOS.to_string(),
            unk: DEFAULT_UNK.to_string(),
            pad: pad.to_string(),
            max_length,
        }
    }

    /// Reads `tokenizer_config.json` and `special_tokens_map.json` (either may be absent).
    /// As transformers' `from_pretrained` does, an entry of `special_tokens_map.json` wins over the
    /// same entry of `tokenizer_config.json`.
    fn from_configs(config: Option<&Value>, special_map: Option<&Value>) -> Self {
        let token = |name: &str, default: &str| -> String {
            [special_map, config]
                .into_iter()
                .flatten()
                .find_map(|v| token_content(v.get(name)?))
                .unwrap_or_else(|| default.to_string())
        };
        // Configs that mean "no limit" write a huge number (1e30) that fits no integer type.
        let max_length = config
            .and_then(|c| c.get("model_max_length"))
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(CLIP_CONTEXT_LENGTH);
        Self {
            bos: token("bos_token", DEFAULT_BOS),
            eos: token("eos_token", DEFAULT_EOS),
            unk: token("unk_token", DEFAULT_UNK),
            pad: token("pad_token", DEFAULT_PAD),
            max_length,
        }
    }
}

/// A special token is written either as a string or as a serialized `AddedToken` object.
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The CLIP BPE tokenizer with its special tokens, padding and truncation rules.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    /// Tokens added after the vocabulary for textual-inversion embeddings: the id of each
    /// embedding's name and the ids it stands for in a prompt (its own, then those of
    /// `name_1` .. `name_{n-1}`).
    expansions: HashMap<u32, Vec<u32>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json` when present, otherwise
    /// `vocab.json` + `merges.txt`; special tokens and `model_max_length` come from
    /// `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let special_map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let special = SpecialTokens::from_configs(config.as_ref(), special_map.as_ref());

        let tokenizer_json = dir.join("tokenizer.json");
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        if tokenizer_json.is_file() {
            let origin = tokenizer_json.display().to_string();
            let mut tokenizer =
                Tokenizer::from_file(&tokenizer_json).map_err(|source| Error::Tokenizer {
                    origin: origin.clone(),
                    source,
                })?;
            // The file may carry its own padding and truncation; `encode` applies ours instead.
            tokenizer.with_padding(None);
            tokenizer
                .with_truncation(None)
                .map_err(|source| Error::Tokenizer {
                    origin: origin.clone(),
                    source,
                })?;
            Self::finish(tokenizer, &special, &origin)
        } else if vocab_path.is_file() && merges_path.is_file() {
            let vocab_json = read_to_string(&vocab_path)?;
            let merges_txt = read_to_string(&merges_path)?;
            let vocab: HashMap<String, u32> =
                serde_json::from_str(&vocab_json).map_err(|source| Error::Json {
                    path: vocab_path.clone(),
                    source,
                })?;
            let origin = format!("{} and {}", vocab_path.display(), merges_path.display());
            let merges = parse_merges(&merges_txt, &merges_path.display().to_string())?;
            let tokenizer = build_clip_bpe(vocab, merges, &special, &origin)?;
            Self::finish(tokenizer, &special, &origin)
        } else {
            Err(Error::MissingTokenizerFiles {
                dir: dir.to_path_buf(),
                looked_for: "tokenizer.json, or vocab.json and merges.txt".to_string(),
            })
        }
    }

    /// Builds the tokenizer from the contents of a `vocab.json` and a `merges.txt`, with
    /// `CLIPTokenizer`'s default begin/end/unknown tokens and the given pad token and length.
    pub fn from_vocab_merges(
        vocab_json: &str,
        merges_txt: &str,
        pad_token: &str,
        max_length: usize,
    ) -> Result<Self> {
        let origin = "the in-memory vocab.json and merges.txt".to_string();
        let vocab: HashMap<String, u32> =
            serde_json::from_str(vocab_json).map_err(|source| Error::Json {
                path: PathBuf::from("<in-memory vocab.json>"),
                source,
            })?;
        let merges = parse_merges(merges_txt, "<in-memory merges.txt>")?;
        let special = SpecialTokens::defaults(pad_token, max_length);
        let tokenizer = build_clip_bpe(vocab, merges, &special, &origin)?;
        Self::finish(tokenizer, &special, &origin)
    }

    /// The tokenizer of every SD1.x and SDXL text encoder, from the CLIP vocabulary built into
    /// the binary (`assets/vocab.json` and `assets/merges.txt`, as OpenAI published them), with
    /// the special tokens and length of a folder's `tokenizer_config.json` and
    /// `special_tokens_map.json` (either may be `None`), read as [`Self::from_dir`] reads them.
    pub fn builtin(
        tokenizer_config: Option<&Value>,
        special_tokens_map: Option<&Value>,
    ) -> Result<Self> {
        let special = SpecialTokens::from_configs(tokenizer_config, special_tokens_map);
        let origin = "the built-in CLIP vocabulary".to_string();
        let vocab: HashMap<String, u32> =
            serde_json::from_str(BUILTIN_VOCAB).map_err(|source| Error::Json {
                path: PathBuf::from("<built-in vocab.json>"),
                source,
            })?;
        let merges = parse_merges(BUILTIN_MERGES, "<built-in merges.txt>")?;
        let tokenizer = build_clip_bpe(vocab, merges, &special, &origin)?;
        Self::finish(tokenizer, &special, &origin)
    }

    /// Registers the special tokens (transformers adds every configured special token to the
    /// backend, so e.g. a pad token `!` is matched whole and never merged into `!!`) and looks
    /// up their ids.
    fn finish(mut tokenizer: Tokenizer, special: &SpecialTokens, origin: &str) -> Result<Self> {
        if special.max_length < 2 {
            return Err(Error::InvalidMaxLength {
                found: special.max_length,
                origin: origin.to_string(),
            });
        }
        let roles = [
            ("unk_token", &special.unk),
            ("bos_token", &special.bos),
            ("eos_token", &special.eos),
            ("pad_token", &special.pad),
        ];
        let mut ids = [0u32; 4];
        for (slot, (role, token)) in ids.iter_mut().zip(roles) {
            // Adding a token that is not in the vocabulary would give it a new id, which no
            // CLIP text encoder has an embedding for.
            *slot = tokenizer
                .token_to_id(token)
                .ok_or_else(|| Error::UnknownSpecialToken {
                    role,
                    token: token.clone(),
                    origin: origin.to_string(),
                })?;
        }
        let added: Vec<AddedToken> = roles
            .iter()
            .map(|(_, token)| AddedToken::from(token.as_str(), true))
            .collect();
        tokenizer
            .add_special_tokens(added)
            .map_err(|source| Error::Tokenizer {
                origin: origin.to_string(),
                source,
            })?;
        let [_, bos_id, eos_id, pad_id] = ids;
        Ok(Self {
            tokenizer,
            max_length: special.max_length,
            bos_id,
            eos_id,
            pad_id,
            expansions: HashMap::new(),
        })
    }

    /// The prompt's BPE ids without begin/end tokens. Added tokens are matched as whole strings
    /// before BPE, and an embedding's name becomes the ids of all its vectors (diffusers'
    /// `maybe_convert_prompt` rewrites `T` as `T T_1 ... T_{n-1}` before tokenizing).
    fn encode_body(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|source| Error::Encode {
                prompt: prompt.to_string(),
                source,
            })?;
        let ids = encoding.get_ids();
        if self.expansions.is_empty() {
            return Ok(ids.to_vec());
        }
        let mut expanded = Vec::with_capacity(ids.len());
        for id in ids {
            match self.expansions.get(id) {
                Some(all) => expanded.extend_from_slice(all),
                None => expanded.push(*id),
            }
        }
        Ok(expanded)
    }

    /// Adds a textual-inversion embedding of `num_vectors` vectors under the name `token`, as
    /// diffusers' `load_textual_inversion` does: the tokens `token`, `token_1`, ...,
    /// `token_{n-1}` get the next ids after the vocabulary (and the tokens added before), in that
    /// order, and are matched as whole strings (after the same lowercasing as the prompt) before
    /// BPE; `token` in a prompt stands for all of them. Returns the ids, one per vector.
    ///
    /// A name (or one of its `_i` forms) that is already a token of the vocabulary or already
    /// added is an error, and nothing is added then.
    pub fn add_embedding_token(&mut self, token: &str, num_vectors: usize) -> Result<Vec<u32>> {
        if token.trim().is_empty() || token.trim() != token {
            return Err(Error::InvalidAddedToken {
                token: token.to_string(),
                expected: "a name that is not empty and neither starts nor ends with whitespace"
                    .to_string(),
            });
        }
        if num_vectors == 0 {
            return Err(Error::InvalidAddedToken {
                token: token.to_string(),
                expected: "an embedding of at least one vector (this one has none)".to_string(),
            });
        }
        let names: Vec<String> = std::iter::once(token.to_string())
            .chain((1..num_vectors).map(|i| format!("{token}_{i}")))
            .collect();
        for name in &names {
            if let Some(id) = self.tokenizer.token_to_id(name) {
                let what = if id >= self.tokenizer.get_vocab_size(false) as u32 {
                    "an added token"
                } else {
                    "a token of the vocabulary"
                };
                return Err(Error::AddedTokenExists {
                    token: name.clone(),
                    id,
                    what,
                });
            }
        }
        let first = self.tokenizer.get_vocab_size(true) as u32;
        let added: Vec<AddedToken> = names
            .iter()
            .map(|name| AddedToken::from(name.as_str(), false))
            .collect();
        self.tokenizer
            .add_tokens(added)
            .map_err(|source| Error::Tokenizer {
                origin: format!("the embedding token {token:?}"),
                source,
            })?;
        let ids = names
            .iter()
            .map(|name| {
                self.tokenizer
                    .token_to_id(name)
                    .ok_or_else(|| Error::InvalidAddedToken {
                        token: name.clone(),
                        expected: "a token the tokenizer accepts".to_string(),
                    })
            })
            .collect::<Result<Vec<u32>>>()?;
        // The text encoder's extra rows are indexed by these ids, so they must follow on.
        let expected: Vec<u32> = (first..first + names.len() as u32).collect();
        if ids != expected {
            return Err(Error::InvalidAddedToken {
                token: token.to_string(),
                expected: format!("the ids {expected:?} after the vocabulary, got {ids:?}"),
            });
        }
        self.expansions.insert(ids[0], ids.clone());
        Ok(ids)
    }

    /// The number of ids the tokenizer can produce: the vocabulary and every added token
    /// (transformers' `len(tokenizer)`).
    pub fn len_with_added(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The prompt's ids without begin/end tokens, neither truncated nor padded:
    /// `tokenizer(prompt, truncation=False, add_special_tokens=False)`, what AUTOMATIC1111
    /// tokenizes each weighted piece of a prompt with.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>> {
        self.encode_body(prompt)
    }

    /// `bos + tokens + eos`, truncated to `max_length` (keeping `eos` last) and padded to
    /// `max_length` with the pad id: `tokenizer(prompt, padding="max_length",
    /// max_length=tokenizer.model_max_length, truncation=True)`.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut body = self.encode_body(prompt)?;
        body.truncate(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&body);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// `bos + tokens + eos` with neither truncation nor padding, as `tokenizer(prompt,
    /// padding="longest")` gives for one prompt (used to warn about what truncation drops).
    pub fn encode_untruncated(&self, prompt: &str) -> Result<Vec<u32>> {
        let body = self.encode_body(prompt)?;
        let mut ids = Vec::with_capacity(body.len() + 2);
        ids.push(self.bos_id);
        ids.extend_from_slice(&body);
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// `model_max_length`: the length `encode` pads and truncates to.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id of a token of the vocabulary, if it has one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

/// Builds the pipeline `CLIPTokenizer.__init__` builds: NFC, whitespace runs collapsed to one
/// space, lowercase; CLIP's split regex then byte-level mapping; BPE whose word-final symbols
/// carry `</w>`; RoBERTa-style `bos ... eos` post-processing and a byte-level decoder.
fn build_clip_bpe(
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    special: &SpecialTokens,
    origin: &str,
) -> Result<Tokenizer> {
    let build_error = |source: tokenizers::Error| Error::Tokenizer {
        origin: origin.to_string(),
        source,
    };
    let bos_id = vocab.get(&special.bos).copied();
    let eos_id = vocab.get(&special.eos).copied();
    let model = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        .unk_token(special.unk.clone())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .fuse_unk(false)
        .byte_fallback(false)
        .build()
        .map_err(build_error)?;

    let normalizer = NormalizerSequence::new(vec![
        NormalizerWrapper::from(NFC),
        NormalizerWrapper::from(
            Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ").map_err(build_error)?,
        ),
        NormalizerWrapper::from(Lowercase),
    ]);
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(build_error)?;
    let pre_tokenizer = PreTokenizerSequence::new(vec![
        PreTokenizerWrapper::from(split),
        PreTokenizerWrapper::from(ByteLevel::new(false, true, true)),
    ]);

    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(build_error)?;
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // `encode` adds bos/eos itself; the post-processor only keeps `encode(.., true)` of the
    // backend faithful. Missing ids are reported by `ClipTokenizer::finish`.
    if let (Some(bos_id), Some(eos_id)) = (bos_id, eos_id) {
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((special.eos.clone(), eos_id), (special.bos.clone(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
    }
    Ok(tokenizer)
}

/// Parses a `merges.txt`: an optional `#version` header, then one `left right` pair per line.
fn parse_merges(merges_txt: &str, origin: &str) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (index, line) in merges_txt.lines().enumerate() {
        if (index == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(left), Some(right), None) => merges.push((left.to_string(), right.to_string())),
            _ => {
                return Err(Error::BadMerge {
                    origin: origin.to_string(),
                    line: index + 1,
                    content: line.to_string(),
                })
            }
        }
    }
    Ok(merges)
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = read_to_string(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A vocabulary just big enough for "a cat": bytes a, c, t, the `</w>` forms, and merges.
    fn tiny_vocab() -> (String, String) {
        let vocab = json!({
            "!": 0, "a": 1, "c": 2, "t": 3, "a</w>": 4, "t</w>": 5, "at</w>": 6, "cat</w>": 7,
            "!</w>": 8, "!!</w>": 9, "<|startoftext|>": 10, "<|endoftext|>": 11
        });
        let merges = "#version: 0.2\na t</w>\nc at</w>\n! !</w>\n";
        (vocab.to_string(), merges.to_string())
    }

    #[test]
    fn encodes_pads_and_truncates() {
        let (vocab, merges) = tiny_vocab();
        let tok = ClipTokenizer::from_vocab_merges(&vocab, &merges, "<|endoftext|>", 5).unwrap();
        assert_eq!(tok.encode("A  Cat").unwrap(), vec![10, 4, 7, 11, 11]);
        assert_eq!(tok.encode_untruncated("a cat").unwrap(), vec![10, 4, 7, 11]);
        // Truncation keeps eos last.
        assert_eq!(tok.encode("a cat a cat").unwrap(), vec![10, 4, 7, 4, 11]);
        assert_eq!(tok.encode("").unwrap(), vec![10, 11, 11, 11, 11]);
    }

    #[test]
    fn pad_token_is_matched_whole() {
        let (vocab, merges) = tiny_vocab();
        let plain = ClipTokenizer::from_vocab_merges(&vocab, &merges, "<|endoftext|>", 6).unwrap();
        assert_eq!(plain.encode_untruncated("!!").unwrap(), vec![10, 9, 11]);
        let bang = ClipTokenizer::from_vocab_merges(&vocab, &merges, "!", 6).unwrap();
        assert_eq!(bang.pad_id(), 0);
        assert_eq!(bang.encode("!!").unwrap(), vec![10, 0, 0, 11, 0, 0]);
    }

    #[test]
    fn unknown_pad_token_is_an_error() {
        let (vocab, merges) = tiny_vocab();
        let err = ClipTokenizer::from_vocab_merges(&vocab, &merges, "<pad>", 6).unwrap_err();
        assert!(matches!(
            err,
            Error::UnknownSpecialToken {
                role: "pad_token",
                ..
            }
        ));
    }

    #[test]
    fn too_short_max_length_is_an_error() {
        let (vocab, merges) = tiny_vocab();
        let err = ClipTokenizer::from_vocab_merges(&vocab, &merges, "!", 1).unwrap_err();
        assert!(matches!(err, Error::InvalidMaxLength { found: 1, .. }));
    }

    #[test]
    fn bad_merge_line_names_its_line() {
        let err = parse_merges("#version: 0.2\na b\nabc\n", "merges.txt").unwrap_err();
        assert!(matches!(err, Error::BadMerge { line: 3, .. }), "{err}");
        assert_eq!(
            parse_merges("a b\n\nc d", "m").unwrap(),
            vec![("a".into(), "b".into()), ("c".into(), "d".into())]
        );
    }

    #[test]
    fn special_tokens_map_wins_and_objects_are_read() {
        let config = json!({"pad_token": "<|endoftext|>", "model_max_length": 64,
                            "bos_token": {"content": "<s>", "lstrip": false}});
        let map = json!({"pad_token": "!"});
        let special = SpecialTokens::from_configs(Some(&config), Some(&map));
        assert_eq!(special.pad, "!");
        assert_eq!(special.bos, "<s>");
        assert_eq!(special.eos, DEFAULT_EOS);
        assert_eq!(special.max_length, 64);
    }

    #[test]
    fn unlimited_model_max_length_falls_back_to_clip_context() {
        let config: Value =
            serde_json::from_str(r#"{"model_max_length": 1000000000000000019884624838656}"#)
                .unwrap();
        let special = SpecialTokens::from_configs(Some(&config), None);
        assert_eq!(special.max_length, CLIP_CONTEXT_LENGTH);
        assert_eq!(SpecialTokens::from_configs(None, None).pad, DEFAULT_PAD);
    }

    #[test]
    fn embedding_tokens_get_the_next_ids_and_expand_in_prompts() {
        let (vocab, merges) = tiny_vocab();
        let mut tok =
            ClipTokenizer::from_vocab_merges(&vocab, &merges, "<|endoftext|>", 12).unwrap();
        assert_eq!(tok.len_with_added(), 12);
        assert_eq!(
            tok.add_embedding_token("<Emb>", 3).unwrap(),
            vec![12, 13, 14]
        );
        assert_eq!(tok.add_embedding_token("one", 1).unwrap(), vec![15]);
        assert_eq!(tok.len_with_added(), 16);
        // Matched whole before BPE, after the prompt's lowercasing, glued to other text or not;
        // the name stands for all its vectors, each time it appears.
        assert_eq!(
            tok.encode_untruncated("a <emb> cat<EMB>").unwrap(),
            vec![10, 4, 12, 13, 14, 7, 12, 13, 14, 11]
        );
        assert_eq!(
            tok.encode_untruncated("one a").unwrap(),
            vec![10, 15, 4, 11]
        );
        // A form `_i` typed alone is that one vector.
        assert_eq!(tok.encode_untruncated("<emb>_2").unwrap(), vec![10, 14, 11]);
        // The expansion happens before truncation, which keeps eos last.
        assert_eq!(
            tok.encode("<emb> <emb> <emb> <emb>").unwrap(),
            vec![10, 12, 13, 14, 12, 13, 14, 12, 13, 14, 12, 11]
        );
    }

    #[test]
    fn embedding_tokens_already_known_are_errors() {
        let (vocab, merges) = tiny_vocab();
        let mut tok =
            ClipTokenizer::from_vocab_merges(&vocab, &merges, "<|endoftext|>", 8).unwrap();
        let err = tok.add_embedding_token("cat</w>", 1).unwrap_err();
        assert!(
            matches!(&err, Error::AddedTokenExists { token, id: 7, what } if token == "cat</w>" && what.contains("vocabulary")),
            "{err}"
        );
        tok.add_embedding_token("x", 2).unwrap();
        let err = tok.add_embedding_token("x", 1).unwrap_err();
        assert!(
            matches!(&err, Error::AddedTokenExists { id: 12, what, .. } if what.contains("added")),
            "{err}"
        );
        // A two-vector `y` adds `y_1` too, so a later embedding named `y_1` collides.
        tok.add_embedding_token("y", 2).unwrap();
        let err = tok.add_embedding_token("y_1", 1).unwrap_err();
        assert!(
            matches!(err, Error::AddedTokenExists { id: 15, .. }),
            "{err}"
        );
        // Nothing of a refused embedding is added.
        let err = tok.add_embedding_token("z", 0).unwrap_err();
        assert!(matches!(err, Error::InvalidAddedToken { .. }), "{err}");
        assert!(matches!(
            tok.add_embedding_token(" z", 1),
            Err(Error::InvalidAddedToken { .. })
        ));
        assert_eq!(tok.len_with_added(), 16);
    }

    #[test]
    fn missing_files_name_the_folder() {
        let dir = std::env::temp_dir().join("sdrs-clip-no-tokenizer-here");
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        match err {
            Error::MissingTokenizerFiles { dir: d, looked_for } => {
                assert_eq!(d, dir);
                assert!(looked_for.contains("merges.txt"));
            }
            other => panic!("unexpected {other}"),
        }
    }
}
