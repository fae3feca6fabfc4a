//! Blank filling with a trained GLM: every `[MASK]`/`[sMASK]`/`[gMASK]` of the
//! text is filled in order, left to right, each blank generated as a Part B
//! block (`<|startofpiece|>` at the blank's position, block positions 1, 2,
//! ...) until `<|endofpiece|>`, seeing the text and the blocks filled before
//! it — the layout the model was trained on. Text without a blank gets one
//! appended, so the model continues it.

use tch::{Device, Kind, Tensor};

use crate::data::tokenizer::GlmTokenizer;
use crate::error::{Error, Result};
use crate::model::glm::{Batch, Glm};

#[derive(Clone, Debug)]
pub struct Sampling {
    /// Tokens generated per blank at most.
    pub max_tokens: usize,
    /// 0 with `top_p` 0: greedy.
    pub top_k: usize,
    pub top_p: f64,
    pub temperature: f64,
    pub seed: i64,
}

pub struct Filled {
    /// The text with every blank filled.
    pub text: String,
    /// Per blank: the generated text.
    pub blanks: Vec<String>,
}

fn pick(logits: &Tensor, s: &Sampling) -> i64 {
    if s.top_k == 0 && s.top_p <= 0.0 {
        return logits.argmax(-1, false).int64_value(&[]);
    }
    let mut l = logits / s.temperature.max(1e-6);
    let v = l.size()[0];
    if s.top_k > 0 && (s.top_k as i64) < v {
        let (top, _) = l.topk(s.top_k as i64, -1, true, true);
        let kth = top.get(s.top_k as i64 - 1);
        l = l.masked_fill(&l.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if s.top_p > 0.0 && s.top_p < 1.0 {
        let (sorted, idx) = l.sort(-1, true);
        let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        // drop tokens once the mass before them already exceeds top_p
        let drop_sorted = (&cum - sorted.softmax(-1, Kind::Float)).gt(s.top_p);
        let drop = drop_sorted.zeros_like().scatter(-1, &idx, &drop_sorted);
        l = l.masked_fill(&drop, f64::NEG_INFINITY);
    }
    l.softmax(-1, Kind::Float).multinomial(1, false).int64_value(&[0])
}

/// Fills the blanks of `text`. `gen_mask` is the token appended when the
/// text has no blank (`[gMASK]` for models trained with task_mask).
pub fn fill(model: &Glm, tok: &GlmTokenizer, text: &str, gen_mask: u32, s: &Sampling) -> Result<Filled> {
    let sp = tok.special;
    let is_mask = |t: u32| t == sp.mask || t == sp.smask || t == sp.gmask;
    if !(s.temperature > 0.0 && s.temperature.is_finite()) {
        return Err(Error::Config(format!("--temperature {}: must be positive and finite", s.temperature)));
    }
    if !(0.0..=1.0).contains(&s.top_p) {
        return Err(Error::Config(format!("--top-p {}: must be in [0, 1] (0: off)", s.top_p)));
    }
    if s.max_tokens == 0 {
        return Err(Error::Config("--max-tokens 0: must be positive".into()));
    }
    // the prompt as training saw its text (the original's punctuation
    // standardisation: curly quotes would otherwise be [UNK])
    let text = crate::data::corpus::standardize_punctuation(text);
    let _doing = crate::runtime::report::doing("generating");
    let mut part_a: Vec<u32> = vec![sp.cls];
    part_a.extend(tok.encode(&text)?);
    if !part_a.iter().any(|&t| is_mask(t)) {
        part_a.push(gen_mask);
    }
    // as the original's generation builds its context: a text that does not
    // end in a blank ends with the end-of-text token
    if !is_mask(*part_a.last().expect("[CLS] at least")) {
        part_a.push(sp.eod);
    }
    let max_pos = model.cfg.max_position_embeddings;
    if part_a.len() >= max_pos {
        return Err(Error::Config(format!("the text has {} tokens; the model holds {max_pos} positions", part_a.len())));
    }
    let sep = part_a.len();
    let blanks: Vec<usize> = (0..sep).filter(|&i| is_mask(part_a[i])).collect();
    let (mut b_tokens, mut b_pos, mut b_block): (Vec<u32>, Vec<u32>, Vec<u32>) = (vec![], vec![], vec![]);
    let mut spans = Vec::new();
    tch::manual_seed(s.seed);
    tch::no_grad(|| -> Result<()> {
        for &p in &blanks {
            let mut span: Vec<u32> = Vec::new();
            loop {
                let mut tokens = part_a.clone();
                tokens.extend(&b_tokens);
                tokens.push(sp.sop);
                tokens.extend(&span);
                let n = tokens.len();
                if n >= max_pos || span.len() >= s.max_tokens {
                    break;
                }
                let mut pos: Vec<u32> = (0..sep as u32).collect();
                pos.extend(&b_pos);
                pos.extend(std::iter::repeat_n(p as u32, span.len() + 1));
                let mut block = vec![0u32; sep];
                block.extend(&b_block);
                block.extend(1..=(span.len() + 1) as u32);
                let t = |v: &[u32]| Tensor::from_slice(&v.iter().map(|&x| x as i64).collect::<Vec<_>>()).view([1, n as i64]).to(model.params.device());
                let batch = Batch {
                    tokens: t(&tokens),
                    targets: t(&tokens),
                    loss_mask: t(&vec![0; n]),
                    position_ids: t(&pos),
                    block_position_ids: t(&block),
                    sep: Tensor::from_slice(&[sep as i64]).to(model.params.device()),
                };
                let h = model.hidden(&batch, false)?;
                let logits = model.logits(&h.get(0).get(n as i64 - 1)).to_device(Device::Cpu);
                let next = pick(&logits, s) as u32;
                if next == sp.eop || next == sp.eod || next >= tok.vocab_size() as u32 {
                    break;
                }
                span.push(next);
            }
            b_tokens.push(sp.sop);
            b_tokens.extend(&span);
            b_pos.extend(std::iter::repeat_n(p as u32, span.len() + 1));
            b_block.extend(1..=(span.len() + 1) as u32);
            spans.push(span);
        }
        Ok(())
    })?;
    let mut out_ids = Vec::new();
    let mut k = 0;
    for (i, &t) in part_a.iter().enumerate().skip(1) {
        if blanks.get(k) == Some(&i) {
            out_ids.extend(&spans[k]);
            k += 1;
        } else {
            out_ids.push(t);
        }
    }
    Ok(Filled { text: tok.decode(&out_ids, true), blanks: spans.iter().map(|s| tok.decode(s, true)).collect() })
}
