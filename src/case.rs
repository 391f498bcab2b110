//! `forward` case files: one full pass over explicitly tagged rows (SPEC §3), as JSON.
//!
//! ```json
//! {"rows": [{"branch": "text", "id": 5, "pos": 0, "block": 0, "masked": false},
//!           {"branch": "image", "id": "reg", "pos": 9, "block": 1, "masked": true}],
//!  "logits_for": [1]}
//! ```
//! All rows form one sequence; row `i` writes pool slot `i`, and every row is a key of every
//! other (visibility decides).

use crate::config::{Branch, Config};
use crate::error::{Error, Result};
use crate::plan::{MAX_BLOCK, PlanBuilder, REGISTER, Row, StepPlan, Tag};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A token id or the register marker `"reg"`. Parsed by hand so that a bad id (negative,
/// fractional, too large, another string) is named in the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum CaseId {
    /// A token id in the row's branch.
    Token(u32),
    /// The string `"reg"`.
    Register(RegisterMarker),
}

/// The literal `"reg"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RegisterMarker {
    /// `"reg"`.
    #[serde(rename = "reg")]
    Reg,
}

impl<'de> Deserialize<'de> for CaseId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct IdVisitor;
        impl serde::de::Visitor<'_> for IdVisitor {
            type Value = CaseId;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a token id (an integer in 0..2^32) or \"reg\"")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<CaseId, E> {
                u32::try_from(v)
                    .map(CaseId::Token)
                    .map_err(|_| E::custom(format!("id {v} does not fit 32 bits (ids are u32)")))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<CaseId, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "id {v} is negative: an id is a token id (0 or more) or \"reg\""
                    ))),
                }
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<CaseId, E> {
                Err(E::custom(format!(
                    "id {v} is not an integer: an id is a token id or \"reg\""
                )))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<CaseId, E> {
                match v {
                    "reg" => Ok(CaseId::Register(RegisterMarker::Reg)),
                    other => Err(E::custom(format!(
                        "id {other:?} is neither a token id nor \"reg\""
                    ))),
                }
            }
        }
        d.deserialize_any(IdVisitor)
    }
}

/// One row of a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRow {
    /// `"text"` or `"image"`.
    pub branch: Branch,
    /// Token id or `"reg"`.
    pub id: CaseId,
    /// RoPE position.
    pub pos: u32,
    /// Block number.
    pub block: u32,
    /// Whether the row is in a masked block.
    pub masked: bool,
}

/// A whole case file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// The rows, in order.
    pub rows: Vec<CaseRow>,
    /// Row indices whose logits are wanted (one branch), in output order.
    pub logits_for: Vec<usize>,
}

impl Case {
    /// Reads and parses a case file (validation happens in [`Case::plan`]).
    pub fn load(path: &Path) -> Result<Case> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Json {
            context: format!("case file {}", path.display()),
            source: e,
        })
    }

    /// Rows per branch (`[text, image]`), for the memory bound of the pass.
    pub fn rows_per_branch(&self) -> [u64; 2] {
        let image = self
            .rows
            .iter()
            .filter(|r| r.branch == Branch::Image)
            .count() as u64;
        [self.rows.len() as u64 - image, image]
    }

    /// A note on rows the file may not mean: masked rows carrying a token id other than their
    /// branch's \[MASK\]. They are valid (`masked` is an attention tag, SPEC §3; the id is
    /// embedded as given, e.g. to test visibility or to teacher-force a masked block), so this
    /// is a note, not an error.
    pub fn note(&self, cfg: &Config) -> Option<String> {
        let odd: Vec<usize> = (self.rows.iter().enumerate())
            .filter(|(_, r)| {
                r.masked && matches!(r.id, CaseId::Token(id) if id != cfg.mask_id(r.branch))
            })
            .map(|(i, _)| i)
            .collect();
        let first = *odd.first()?;
        Some(format!(
            "note: {} masked row(s) carry a token id other than their branch's [MASK] (first: \
             row {first}); such a row is embedded as that token, `masked` only tags its \
             visibility (docs/SPEC.md §3)",
            odd.len()
        ))
    }

    /// Checks ids, positions and blocks against `cfg` and builds the plan of one full pass.
    ///
    /// Errors besides out-of-range fields: no rows; an empty `logits_for` (a case exists to
    /// produce logits); two identical rows (same branch, id, position, block and tag: one token
    /// twice, which doubles its weight as a key and is always a mistake in a file). Rows that
    /// share a position with different content are allowed: positions are free inputs.
    pub fn plan(&self, cfg: &Config) -> Result<StepPlan> {
        if self.rows.is_empty() {
            return Err(Error::Input("case: no rows".into()));
        }
        if self.logits_for.is_empty() {
            return Err(Error::Input(
                "case logits_for is empty: list the rows whose logits to compute".into(),
            ));
        }
        let mut seen = std::collections::HashMap::with_capacity(self.rows.len());
        for (i, r) in self.rows.iter().enumerate() {
            let key = (r.branch, r.id, r.pos, r.block, r.masked);
            if let Some(first) = seen.insert(key, i) {
                return Err(Error::Input(format!(
                    "case rows {first} and {i} are identical (branch, id, pos, block, masked): \
                     a token cannot be fed twice"
                )));
            }
        }
        let mut pb = PlanBuilder::new(1);
        for (i, r) in self.rows.iter().enumerate() {
            let id = match r.id {
                CaseId::Register(_) => REGISTER,
                CaseId::Token(id) => {
                    let rows = cfg.embed_rows(r.branch);
                    if id as usize >= rows {
                        return Err(Error::Input(format!(
                            "case row {i}: id {id} outside the {} embedding (0..{rows})",
                            r.branch.name()
                        )));
                    }
                    id
                }
            };
            if r.block > MAX_BLOCK {
                return Err(Error::Input(format!(
                    "case row {i}: block {} > {MAX_BLOCK}",
                    r.block
                )));
            }
            if r.pos >= 1 << 31 {
                return Err(Error::Input(format!(
                    "case row {i}: position {} ≥ 2^31",
                    r.pos
                )));
            }
            let tag = Tag::new(r.branch, r.block, r.masked);
            pb.row(Row {
                seq: 0,
                id,
                pos: r.pos,
                tag,
                slot: i as u32,
            });
        }
        let mut branch = None;
        for &i in &self.logits_for {
            let Some(r) = self.rows.get(i) else {
                return Err(Error::Input(format!(
                    "case logits_for: row {i} does not exist ({} rows)",
                    self.rows.len()
                )));
            };
            if matches!(r.id, CaseId::Register(_)) {
                return Err(Error::Input(format!(
                    "case logits_for: row {i} is a register"
                )));
            }
            if *branch.get_or_insert(r.branch) != r.branch {
                return Err(Error::Input(
                    "case logits_for: rows of both branches".into(),
                ));
            }
            pb.logits_for(i);
        }
        // Rows of the other branch cannot reach the logits after the joint layers.
        pb.skip_after_joint(branch.map(Branch::other));
        pb.build()
    }
}
