//! AUTOMATIC1111's prompt syntax: the attention parser of `modules/prompt_parser.py`
//! (`parse_prompt_attention`: `(text)`, `[text]`, `(text:w)`, escapes, `BREAK`) and the chunking of
//! `modules/sd_hijack_clip.py` (`tokenize_line`: 75-token chunks with comma back-tracking, each
//! `[BOS] + tokens + [EOS]` padding, with a weight per token). Pure logic: the tokenizer is passed
//! in, the encoding of the chunks is `conditioning.rs`'s.

/// The text of the marker [`parse_prompt_attention`] puts where a prompt says `BREAK`.
pub const BREAK: &str = "BREAK";
/// The weight of the `BREAK` marker. A marker whose weight brackets changed is no marker any more:
/// A1111 then tokenizes the word (`(a BREAK b)` has the word "break" at weight -1.1).
pub const BREAK_WEIGHT: f64 = -1.0;

/// `(text)` multiplies the weight of `text` by this.
const ROUND_BRACKET_MULTIPLIER: f64 = 1.1;
/// `[text]` multiplies the weight of `text` by `1 / 1.1`.
const SQUARE_BRACKET_MULTIPLIER: f64 = 1.0 / 1.1;

/// A1111's `opts.comma_padding_backtrack` (its default): a chunk that fills up within this many
/// tokens after a comma ends at the comma, and what follows it starts the next chunk.
pub const COMMA_PADDING_BACKTRACK: usize = 20;

/// One token of the attention grammar, in the order of the alternatives of A1111's `re_attention`
/// (the first that matches at a position wins).
enum Token<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\`: the character itself; a lone `\` stands for nothing.
    Escaped(&'a str),
    OpenRound,
    OpenSquare,
    /// `:w)`, with its text for when no round bracket is open.
    Weight(f64, &'a str),
    CloseRound,
    CloseSquare,
    /// A run of anything else, or a lone `:`.
    Text(&'a str),
}

/// The token at the start of `text` (not empty) and its length in bytes.
fn next_token(text: &str) -> (Token<'_>, usize) {
    let mut chars = text.chars();
    let first = chars.next().unwrap_or(' ');
    match first {
        '\\' => match chars.next() {
            Some(c @ ('(' | ')' | '[' | ']' | '\\')) => {
                (Token::Escaped(&text[1..2]), 1 + c.len_utf8())
            }
            _ => (Token::Escaped(""), 1),
        },
        '(' => (Token::OpenRound, 1),
        '[' => (Token::OpenSquare, 1),
        ':' => match weight_at(text) {
            Some((weight, len)) => (Token::Weight(weight, &text[..len]), len),
            None => (Token::Text(&text[..1]), 1),
        },
        ')' => (Token::CloseRound, 1),
        ']' => (Token::CloseSquare, 1),
        _ => {
            let len = text
                .find(['\\', '(', ')', '[', ']', ':'])
                .unwrap_or(text.len());
            (Token::Text(&text[..len]), len)
        }
    }
}

/// `:([+-]?[.\d]+)\)` at the start of `text`: the weight and the length of the match. A number
/// Python's `float` refuses (`:.)`, `:1.2.3)`) makes A1111 fail; here the `:` is then text, as
/// if the weight alternative were not there.
fn weight_at(text: &str) -> Option<(f64, usize)> {
    let bytes = text.as_bytes();
    let mut end = 1;
    if matches!(bytes.get(end), Some(b'+' | b'-')) {
        end += 1;
    }
    let digits = end;
    while matches!(bytes.get(end), Some(b'.' | b'0'..=b'9')) {
        end += 1;
    }
    if end == digits || bytes.get(end) != Some(&b')') {
        return None;
    }
    let weight = text[1..end].parse::<f64>().ok()?;
    Some((weight, end + 1))
}

/// Python's `\s` (`str.isspace`): Unicode whitespace and the separators U+001C..U+001F.
fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `\w`: letters, digits and the underscore.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`: the pieces between the whole words `BREAK`, the
/// whitespace around each one dropped.
fn split_break(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut part_start, mut search) = (0, 0);
    while let Some(offset) = text[search..].find(BREAK) {
        let at = search + offset;
        let after = at + BREAK.len();
        let word_before = text[..at].chars().next_back().is_some_and(is_word);
        let word_after = text[after..].chars().next().is_some_and(is_word);
        if word_before || word_after {
            search = after;
            continue;
        }
        // The match starts where the whitespace run before the word starts, but not inside the
        // previous match.
        let start = text[part_start..at]
            .char_indices()
            .rev()
            .take_while(|&(_, c)| is_space(c))
            .last()
            .map_or(at, |(i, _)| part_start + i);
        let end = text[after..]
            .char_indices()
            .find(|&(_, c)| !is_space(c))
            .map_or(text.len(), |(i, _)| after + i);
        parts.push(&text[part_start..start]);
        part_start = end;
        search = end;
    }
    parts.push(&text[part_start..]);
    parts
}

/// A1111's `parse_prompt_attention`: the prompt as pieces of text with their weights. `(a)`
/// multiplies by 1.1, `[a]` by 1/1.1, `(a:w)` by `w` (`w` directly followed by `)`); brackets left
/// open are closed at the end; `\(` `\)` `\[` `\]` `\\` are the characters themselves; the whole
/// word `BREAK` with the whitespace around it becomes the marker ([`BREAK`], [`BREAK_WEIGHT`]);
/// neighbours of equal weight are merged; an empty prompt is `[("", 1.0)]`.
///
/// ```
/// use sdrs_pipeline::pipeline::prompt::parse_prompt_attention;
/// assert_eq!(
///     parse_prompt_attention("an (important) word"),
///     [("an ".to_string(), 1.0), ("important".to_string(), 1.1), (" word".to_string(), 1.0)]
/// );
/// ```
pub fn parse_prompt_attention(text: &str) -> Vec<(String, f64)> {
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply_range = |res: &mut Vec<(String, f64)>, start: usize, multiplier: f64| {
        for piece in &mut res[start..] {
            piece.1 *= multiplier;
        }
    };
    let push_text = |res: &mut Vec<(String, f64)>, text: &str| {
        for (i, part) in split_break(text).into_iter().enumerate() {
            if i > 0 {
                res.push((BREAK.to_string(), BREAK_WEIGHT));
            }
            res.push((part.to_string(), 1.0));
        }
    };
    let mut rest = text;
    while !rest.is_empty() {
        let (token, len) = next_token(rest);
        let matched = &rest[..len];
        rest = &rest[len..];
        match token {
            Token::Escaped(text) => res.push((text.to_string(), 1.0)),
            Token::OpenRound => round.push(res.len()),
            Token::OpenSquare => square.push(res.len()),
            Token::Weight(weight, text) => match round.pop() {
                Some(start) => multiply_range(&mut res, start, weight),
                None => push_text(&mut res, text),
            },
            Token::CloseRound => match round.pop() {
                Some(start) => multiply_range(&mut res, start, ROUND_BRACKET_MULTIPLIER),
                None => push_text(&mut res, matched),
            },
            Token::CloseSquare => match square.pop() {
                Some(start) => multiply_range(&mut res, start, SQUARE_BRACKET_MULTIPLIER),
                None => push_text(&mut res, matched),
            },
            Token::Text(text) => push_text(&mut res, text),
        }
    }
    for start in round {
        multiply_range(&mut res, start, ROUND_BRACKET_MULTIPLIER);
    }
    for start in square {
        multiply_range(&mut res, start, SQUARE_BRACKET_MULTIPLIER);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].1 == res[i + 1].1 {
            let next = res.remove(i + 1);
            res[i].0.push_str(&next.0);
        } else {
            i += 1;
        }
    }
    res
}

/// Whether a parsed piece is the `BREAK` marker (and not the word at another weight).
pub fn is_break(text: &str, weight: f64) -> bool {
    text == BREAK && weight == BREAK_WEIGHT
}

/// What chunking needs to know of a tokenizer and its text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRules {
    pub bos: u32,
    pub eos: u32,
    /// What the encoder gets after the first `eos` (A1111's `id_pad`): `eos` for CLIP, 0 for the
    /// OpenCLIP encoders (SD2.x, SDXL's second), whose tokenizers pad with `!` (id 0).
    pub pad: u32,
    /// The id of `,</w>`, where a chunk may end early; `None`: no back-tracking.
    pub comma: Option<u32>,
    /// The ids one chunk holds with its begin and end tokens (77).
    pub context_length: usize,
}

impl TokenRules {
    /// The prompt tokens one chunk holds (75).
    pub fn chunk_length(&self) -> usize {
        self.context_length.saturating_sub(2).max(1)
    }
}

/// One chunk of a prompt: `context_length` ids and one weight per id.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    /// `[BOS] + tokens + [EOS]...`, as A1111's `PromptChunk.tokens` once closed.
    pub ids: Vec<u32>,
    /// 1.0 on the begin, end and padding ids.
    pub weights: Vec<f64>,
}

impl PromptChunk {
    /// The ids the text encoder gets: every id after the first `eos` replaced by `rules.pad`.
    pub fn model_ids(&self, rules: &TokenRules) -> Vec<u32> {
        let mut ids = self.ids.clone();
        if let Some(first) = ids.iter().position(|&id| id == rules.eos) {
            for id in &mut ids[first + 1..] {
                *id = rules.pad;
            }
        }
        ids
    }

    /// Whether every weight is 1 (the weighting then leaves the encoding as it is).
    pub fn is_unweighted(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }
}

/// Builds the chunks of `tokenize_line`, one token at a time.
struct Chunker<'a> {
    rules: &'a TokenRules,
    chunks: Vec<PromptChunk>,
    tokens: Vec<u32>,
    weights: Vec<f64>,
    last_comma: Option<usize>,
}

impl Chunker<'_> {
    /// Closes the current chunk: padded with `eos` to the chunk length, between `bos` and `eos`.
    fn next_chunk(&mut self) {
        let length = self.rules.chunk_length();
        let mut ids = Vec::with_capacity(length + 2);
        ids.push(self.rules.bos);
        ids.append(&mut self.tokens);
        ids.resize(length + 1, self.rules.eos);
        ids.push(self.rules.eos);
        let mut weights = Vec::with_capacity(length + 2);
        weights.push(1.0);
        weights.append(&mut self.weights);
        weights.resize(length + 2, 1.0);
        self.chunks.push(PromptChunk { ids, weights });
        self.last_comma = None;
    }

    fn push(&mut self, token: u32, weight: f64) {
        let length = self.rules.chunk_length();
        if Some(token) == self.rules.comma {
            self.last_comma = Some(self.tokens.len());
        } else if let Some(comma) = self.last_comma {
            // A full chunk with a comma among its last tokens ends at the comma; the tokens after
            // it move on to the next chunk. (A comma arriving at a full chunk just starts the
            // next one.)
            if self.tokens.len() == length && length - comma <= COMMA_PADDING_BACKTRACK {
                let moved = self.tokens.split_off(comma + 1);
                let moved_weights = self.weights.split_off(comma + 1);
                self.next_chunk();
                self.tokens = moved;
                self.weights = moved_weights;
            }
        }
        if self.tokens.len() == length {
            self.next_chunk();
        }
        self.tokens.push(token);
        self.weights.push(weight);
    }
}

/// A1111's `tokenize_line` on a parsed prompt: `tokens[i]` are the ids of `parsed[i]`'s text
/// (without begin/end tokens; a `BREAK` marker's are not looked at). Every token takes its piece's
/// weight; a `BREAK` closes the current chunk, even an empty one; a prompt without tokens is one
/// chunk `[BOS, EOS...]`.
pub fn chunk_tokens(
    parsed: &[(String, f64)],
    tokens: &[Vec<u32>],
    rules: &TokenRules,
) -> Vec<PromptChunk> {
    let mut chunker = Chunker {
        rules,
        chunks: Vec::new(),
        tokens: Vec::new(),
        weights: Vec::new(),
        last_comma: None,
    };
    for ((text, weight), ids) in parsed.iter().zip(tokens) {
        if is_break(text, *weight) {
            chunker.next_chunk();
            continue;
        }
        for &id in ids {
            chunker.push(id, *weight);
        }
    }
    if !chunker.tokens.is_empty() || chunker.chunks.is_empty() {
        chunker.next_chunk();
    }
    chunker.chunks
}

/// A prompt in A1111's syntax as its chunks: parsed, each piece tokenized by `tokenize` (ids
/// without begin/end tokens, untruncated), then chunked.
pub fn prompt_chunks<E>(
    prompt: &str,
    rules: &TokenRules,
    mut tokenize: impl FnMut(&str) -> Result<Vec<u32>, E>,
) -> Result<Vec<PromptChunk>, E> {
    let parsed = parse_prompt_attention(prompt);
    let tokens = parsed
        .iter()
        .map(|(text, weight)| {
            if is_break(text, *weight) {
                Ok(Vec::new())
            } else {
                tokenize(text)
            }
        })
        .collect::<Result<Vec<_>, E>>()?;
    Ok(chunk_tokens(&parsed, &tokens, rules))
}

/// A1111's "Original" emphasis (`EmphasisOriginal` of `modules/sd_emphasis.py`) of one chunk's
/// hidden state, `values` laid out `[tokens, channels]` with one weight per token: each token's
/// state times its weight, then everything times `mean(before) / mean(after)`. Computed in f32
/// as A1111 computes it (its multipliers are a float32 tensor), the means summed in torch's order
/// ([`torch_sum`]): a hidden state's mean is about a thousand times smaller than its values, so
/// the order of the sum shows in the result (up to 1e-4 on the reference's; torch's own order
/// gives its numbers). A chunk whose weights are all 1 is left exactly as it is.
pub fn emphasize(values: &mut [f32], weights: &[f64]) {
    if weights.iter().all(|&w| w == 1.0) || weights.is_empty() {
        return;
    }
    let original_mean = torch_sum(values) / values.len() as f32;
    let channels = values.len() / weights.len();
    for (token, &weight) in values.chunks_mut(channels).zip(weights) {
        let weight = weight as f32;
        for value in token {
            *value *= weight;
        }
    }
    let new_mean = torch_sum(values) / values.len() as f32;
    let factor = original_mean / new_mean;
    for value in values {
        *value *= factor;
    }
}

/// torch's sum of a contiguous f32 array on the CPU (`cascade_sum`, `vectorized_inner_sum`,
/// `row_sum` and `multi_row_sum` of `aten/src/ATen/native/cpu/SumKernel.cpp`), as its AVX2
/// kernels add: 8-lane vectors into four interleaved accumulators through four cascade levels,
/// then the four accumulators, the scalar tail and the lanes in order. One thread's order: torch
/// splits a sum of more than 32768 values (`GRAIN_SIZE`) across its threads.
pub fn torch_sum(values: &[f32]) -> f32 {
    const LANES: usize = 8;
    if values.len() < LANES {
        let scalars: Vec<[f32; 1]> = values.iter().map(|&v| [v]).collect();
        return row_sum(&scalars)[0];
    }
    let vectors: Vec<[f32; LANES]> = values
        .chunks_exact(LANES)
        .map(|chunk| std::array::from_fn(|lane| chunk[lane]))
        .collect();
    let lanes = row_sum(&vectors);
    let mut total = 0f32;
    for &value in &values[vectors.len() * LANES..] {
        total += value;
    }
    for lane in lanes {
        total += lane;
    }
    total
}

fn add_lanes<const L: usize>(sum: &mut [f32; L], other: &[f32; L]) {
    for (s, o) in sum.iter_mut().zip(other) {
        *s += o;
    }
}

/// torch's `row_sum` with four interleaved accumulators (`ilp_factor`).
fn row_sum<const L: usize>(vectors: &[[f32; L]]) -> [f32; L] {
    const ROWS: usize = 4;
    let rows = vectors.len() / ROWS;
    let mut partial = multi_row_sum(vectors, rows);
    for vector in &vectors[rows * ROWS..] {
        add_lanes(&mut partial[0], vector);
    }
    for k in 1..ROWS {
        let other = partial[k];
        add_lanes(&mut partial[0], &other);
    }
    partial[0]
}

/// torch's `multi_row_sum`: `rows` rows of four vectors, each column summed through four
/// levels of accumulators, a level passed on every `2^level_power` rows.
fn multi_row_sum<const L: usize>(vectors: &[[f32; L]], rows: usize) -> [[f32; L]; 4] {
    const ROWS: usize = 4;
    const LEVELS: usize = 4;
    // torch's `CeilLog2`: 1 up to 2, else the bits of `rows - 1`.
    let ceil_log2 = if rows <= 2 {
        1
    } else {
        (usize::BITS - (rows - 1).leading_zeros()) as usize
    };
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; L]; ROWS]; LEVELS];
    let add_row = |sums: &mut [[f32; L]; ROWS], row: usize| {
        for (sum, vector) in sums.iter_mut().zip(&vectors[row * ROWS..]) {
            add_lanes(sum, vector);
        }
    };
    let mut i = 0;
    while i + level_step <= rows {
        for _ in 0..level_step {
            add_row(&mut acc[0], i);
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (sum, low) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add_lanes(sum, low);
                *low = [0.0; L];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        add_row(&mut acc[0], i);
        i += 1;
    }
    let (first, levels) = acc.split_at_mut(1);
    for level in levels.iter() {
        for (sum, part) in first[0].iter_mut().zip(level) {
            add_lanes(sum, part);
        }
    }
    first[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(text)
    }

    fn pieces(list: &[(&str, f64)]) -> Vec<(String, f64)> {
        list.iter().map(|&(t, w)| (t.to_string(), w)).collect()
    }

    #[test]
    fn a1111_docstring_examples_parse_as_documented() {
        assert_eq!(parsed("normal text"), pieces(&[("normal text", 1.0)]));
        assert_eq!(parsed("(unbalanced"), pieces(&[("unbalanced", 1.1)]));
        assert_eq!(
            parsed("(unnecessary)(parens)"),
            pieces(&[("unnecessaryparens", 1.1)])
        );
        assert_eq!(
            parsed("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            pieces(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn escapes_are_literal_and_a_lone_backslash_is_dropped() {
        assert_eq!(parsed(r"\(literal\]"), pieces(&[("(literal]", 1.0)]));
        assert_eq!(
            parsed(r"\(escaped\) \[also\] back\\slash"),
            pieces(&[(r"(escaped) [also] back\slash", 1.0)])
        );
        // `\` before anything else matches the regex's lone `\\`, whose text[1:] is empty.
        assert_eq!(parsed(r"back\slash"), pieces(&[("backslash", 1.0)]));
        assert_eq!(parsed(r"end\"), pieces(&[("end", 1.0)]));
        assert_eq!(parsed(r"(\:1.5)"), pieces(&[("", 1.5)]));
    }

    #[test]
    fn weights_multiply_through_nesting() {
        assert_eq!(parsed("((word))"), pieces(&[("word", 1.1 * 1.1)]));
        assert_eq!(parsed("[[word]]"), pieces(&[("word", 1.0 / 1.1 / 1.1)]));
        assert_eq!(
            parsed("(a (b:0.5) c:1.2)"),
            pieces(&[("a ", 1.2), ("b", 0.6), (" c", 1.2)])
        );
        assert_eq!(parsed("(word:-0.5)"), pieces(&[("word", -0.5)]));
        assert_eq!(parsed("(word:.5)"), pieces(&[("word", 0.5)]));
        assert_eq!(parsed("(word:1.)"), pieces(&[("word", 1.0)]));
        assert_eq!(parsed("(word:+2)"), pieces(&[("word", 2.0)]));
    }

    #[test]
    fn a_weight_needs_its_closing_bracket_right_after_the_number() {
        assert_eq!(parsed("(word: 1.5)"), pieces(&[("word: 1.5", 1.1)]));
        assert_eq!(parsed("(word:1.5 )"), pieces(&[("word:1.5 ", 1.1)]));
        assert_eq!(parsed("(a:1.2:3)"), pieces(&[("a:1.2", 3.0)]));
        assert_eq!(parsed("[a:b:0.5]"), pieces(&[("a:b:0.5", 1.0 / 1.1)]));
        // A number Python's float refuses: the colon is text (A1111 raises).
        assert_eq!(parsed("(word:.)"), pieces(&[("word:.", 1.1)]));
        assert_eq!(parsed("(word:1.2.3)"), pieces(&[("word:1.2.3", 1.1)]));
        // No round bracket open: the weight is text.
        assert_eq!(parsed("word:1.5)"), pieces(&[("word:1.5)", 1.0)]));
    }

    #[test]
    fn unbalanced_brackets_close_at_the_end_or_are_text() {
        assert_eq!(parsed("((a) b"), pieces(&[("a", 1.1 * 1.1), (" b", 1.1)]));
        assert_eq!(
            parsed("unmatched ) and ]"),
            pieces(&[("unmatched ) and ]", 1.0)])
        );
        assert_eq!(
            parsed("(mixed [brackets)]"),
            pieces(&[("mixed ", 1.1), ("brackets", 1.0)])
        );
        assert_eq!(parsed("[open"), pieces(&[("open", 1.0 / 1.1)]));
    }

    #[test]
    fn break_is_a_marker_only_as_a_whole_word_at_its_own_weight() {
        let marker = (BREAK, BREAK_WEIGHT);
        assert_eq!(
            parsed("a BREAK b"),
            pieces(&[("a", 1.0), marker, ("b", 1.0)])
        );
        assert_eq!(parsed("aBREAKb"), pieces(&[("aBREAKb", 1.0)]));
        assert_eq!(parsed("a BREAK_b"), pieces(&[("a BREAK_b", 1.0)]));
        assert_eq!(
            parsed("a BREAK BREAK b"),
            pieces(&[("a", 1.0), marker, ("", 1.0), marker, ("b", 1.0)])
        );
        assert_eq!(parsed("BREAK"), pieces(&[("", 1.0), marker, ("", 1.0)]));
        assert_eq!(
            parsed("a,BREAK\t\n b"),
            pieces(&[("a,", 1.0), marker, ("b", 1.0)])
        );
        // Inside brackets the marker is multiplied too, and is then the word.
        let inside = parsed("(a BREAK b)");
        assert_eq!(inside, pieces(&[("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]));
        assert!(!is_break(&inside[1].0, inside[1].1));
    }

    #[test]
    fn an_empty_prompt_is_one_empty_piece() {
        assert_eq!(parsed(""), pieces(&[("", 1.0)]));
        assert_eq!(parsed("()"), pieces(&[("", 1.0)]));
    }

    const COMMA: u32 = 9;

    fn rules(context_length: usize) -> TokenRules {
        TokenRules {
            bos: 100,
            eos: 101,
            pad: 0,
            comma: Some(COMMA),
            context_length,
        }
    }

    /// The tokens of each chunk between its begin token and its padding.
    fn bodies(chunks: &[PromptChunk], rules: &TokenRules) -> Vec<Vec<u32>> {
        chunks
            .iter()
            .map(|c| {
                assert_eq!(c.ids.len(), rules.context_length);
                assert_eq!(c.weights.len(), rules.context_length);
                assert_eq!(c.ids[0], rules.bos);
                assert_eq!(*c.ids.last().unwrap(), rules.eos);
                let end = c.ids[1..].iter().position(|&id| id == rules.eos).unwrap();
                c.ids[1..1 + end].to_vec()
            })
            .collect()
    }

    fn one_piece(tokens: Vec<u32>, weight: f64, rules: &TokenRules) -> Vec<PromptChunk> {
        chunk_tokens(&[("text".to_string(), weight)], &[tokens], rules)
    }

    #[test]
    fn chunks_hold_75_tokens_between_bos_and_eos_padding() {
        let rules = rules(77);
        let chunks = one_piece((1..=80).collect(), 1.5, &rules);
        let bodies = bodies(&chunks, &rules);
        assert_eq!(bodies.len(), 2);
        assert_eq!(bodies[0], (1..=75).collect::<Vec<_>>());
        assert_eq!(bodies[1], (76..=80).collect::<Vec<_>>());
        assert_eq!(chunks[1].weights[..7], [1.0, 1.5, 1.5, 1.5, 1.5, 1.5, 1.0]);
        assert!(chunks[1].weights[7..].iter().all(|&w| w == 1.0));
        // Exactly 75 tokens: one chunk.
        assert_eq!(one_piece((1..=75).collect(), 1.0, &rules).len(), 1);
    }

    #[test]
    fn a_full_chunk_backtracks_to_a_comma_within_20_tokens() {
        let rules = rules(77);
        // A comma at index 60 of the chunk: 75 - 60 <= 20, the 14 tokens after it move on.
        let mut tokens: Vec<u32> = (1000..1060).collect();
        tokens.push(COMMA);
        tokens.extend(2000..2020);
        let split = bodies(&one_piece(tokens.clone(), 1.0, &rules), &rules);
        assert_eq!(split[0], tokens[..61]);
        assert_eq!(split[1], tokens[61..]);
        // A comma at index 50: 75 - 50 > 20, no back-tracking.
        let mut tokens: Vec<u32> = (1000..1050).collect();
        tokens.push(COMMA);
        tokens.extend(2000..2030);
        let split = bodies(&one_piece(tokens.clone(), 1.0, &rules), &rules);
        assert_eq!(split[0], tokens[..75]);
        assert_eq!(split[1], tokens[75..]);
        // Index 55 is the last that moves (75 - 55 = 20).
        let mut tokens: Vec<u32> = (1000..1055).collect();
        tokens.push(COMMA);
        tokens.extend(2000..2030);
        let split = bodies(&one_piece(tokens.clone(), 1.0, &rules), &rules);
        assert_eq!(split[0], tokens[..56]);
    }

    #[test]
    fn a_comma_arriving_at_a_full_chunk_starts_the_next_one_without_backtracking() {
        let rules = rules(77);
        let mut tokens: Vec<u32> = (1000..1075).collect();
        tokens[60] = COMMA;
        tokens.push(COMMA);
        tokens.extend(2000..2005);
        let bodies = bodies(&one_piece(tokens.clone(), 1.0, &rules), &rules);
        assert_eq!(bodies[0], tokens[..75]);
        assert_eq!(bodies[1], tokens[75..]);
    }

    #[test]
    fn moved_tokens_keep_their_weights() {
        let rules = rules(8); // 6 tokens a chunk
        let parsed = pieces(&[("a", 1.0), ("b", 2.0)]);
        let chunks = chunk_tokens(&parsed, &[vec![1, COMMA, 3], vec![4, 5, 6, 7]], &rules);
        assert_eq!(
            bodies(&chunks, &rules),
            [vec![1, COMMA], vec![3, 4, 5, 6, 7]]
        );
        assert_eq!(chunks[0].weights, [1.0; 8]);
        assert_eq!(chunks[1].weights, [1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0]);
    }

    #[test]
    fn break_closes_the_chunk_even_an_empty_one() {
        let rules = rules(77);
        let text = |prompt: &str| {
            let parsed = parse_prompt_attention(prompt);
            let tokens: Vec<Vec<u32>> = parsed
                .iter()
                .map(|(t, _)| t.split_whitespace().map(|w| w.len() as u32).collect())
                .collect();
            bodies(&chunk_tokens(&parsed, &tokens, &rules), &rules)
        };
        assert_eq!(text("ab BREAK abc"), [vec![2], vec![3]]);
        let none: Vec<u32> = Vec::new();
        assert_eq!(text("BREAK abc"), [none.clone(), vec![3]]);
        assert_eq!(text("ab BREAK"), [vec![2]]);
        assert_eq!(text("BREAK"), std::slice::from_ref(&none));
        assert_eq!(text("a BREAK BREAK b"), [vec![1], none.clone(), vec![1]]);
        assert_eq!(text(""), [none]);
    }

    #[test]
    fn model_ids_pad_after_the_first_eos() {
        let rules = rules(6);
        let chunk = &one_piece(vec![1, 2], 1.0, &rules)[0];
        assert_eq!(chunk.ids, [100, 1, 2, 101, 101, 101]);
        assert_eq!(chunk.model_ids(&rules), [100, 1, 2, 101, 0, 0]);
        let clip = TokenRules { pad: 101, ..rules };
        assert_eq!(chunk.model_ids(&clip), chunk.ids);
        assert!(chunk.is_unweighted());
    }

    /// Values in [-10, 10.6] whose f32 sum depends on the order of the additions.
    fn wave(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 2003) as f32 / 97.0 - 10.0)
            .collect()
    }

    #[test]
    fn torch_sum_adds_in_torchs_order() {
        // The bits torch's AVX2 order gives (from a model of its kernels that reproduces the
        // A1111 reference's weighted conditioning exactly); the exact sum of 2464 is 820.597935.
        let bits = |n: usize| torch_sum(&wave(n)).to_bits();
        assert_eq!(bits(2464), 0x444d2644);
        assert_eq!(bits(100), 0x426283f5);
        assert_eq!(bits(37), 0x423259bb);
        assert_eq!(bits(5), 0x41b8151c);
        assert_eq!(torch_sum(&[]), 0.0);
    }

    #[test]
    fn emphasis_weights_each_token_and_keeps_the_mean() {
        let original: Vec<f32> = wave(3 * 4).iter().map(|v| v + 1.0).collect();
        let mut values = original.clone();
        emphasize(&mut values, &[1.0, 1.0, 1.0]);
        assert_eq!(values, original, "unweighted chunks are left as they are");
        emphasize(&mut values, &[1.0, 2.0, 0.5]);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean(&values) - mean(&original)).abs() < 1e-5);
        // Every token is scaled by its weight times one common factor.
        let factor = values[0] / original[0];
        for (i, (v, o)) in values.iter().zip(&original).enumerate() {
            let weight = [1.0, 2.0, 0.5][i / 4];
            assert!((v / o - factor * weight).abs() < 1e-5, "{i}");
        }
    }

    #[test]
    fn prompt_chunks_tokenizes_each_piece_and_passes_errors_on() {
        let rules = rules(77);
        let mut seen = Vec::new();
        let chunks = prompt_chunks("a (b:2) BREAK c", &rules, |text| {
            seen.push(text.to_string());
            Ok::<_, ()>(text.split_whitespace().map(|w| w.len() as u32).collect())
        })
        .unwrap();
        assert_eq!(seen, ["a ", "b", "", "c"]);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].weights[..4], [1.0, 1.0, 2.0, 1.0]);
        assert!(prompt_chunks("x", &rules, |_| Err::<Vec<u32>, _>("no")).is_err());
    }
}
