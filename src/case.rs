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

/// A token id or the register marker `"reg"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CaseId {
    /// A token id in the row's branch.
    Token(u32),
    /// The string `"reg"`.
    Register(RegisterMarker),
}

/// The literal `"reg"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegisterMarker {
    /// `"reg"`.
    #[serde(rename = "reg")]
    Reg,
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

    /// Checks ids, positions and blocks against `cfg` and builds the plan of one full pass.
    pub fn plan(&self, cfg: &Config) -> Result<StepPlan> {
        if self.rows.is_empty() {
            return Err(Error::Input("case: no rows".into()));
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
