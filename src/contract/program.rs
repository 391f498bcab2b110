//! The device-resident program's formats (`SlPatch`, `SlResolveParams`, `SlCommitParams` of
//! `kernels/params.h`): the [`Patch`] that overwrites one entry of a step's template plan, the
//! [`DeviceState`] a generation keeps between steps, the [`Lists`] the patches read, and the
//! [`CommitRule`] of a step. The sampler compiles programs in these terms; `sl_resolve_plan` and
//! `sl_commit` (and their host twins) execute them.

use crate::error::{Error, Result};

fn bad<T>(op: &str, msg: impl std::fmt::Display) -> Result<T> {
    Err(Error::Input(format!("{op}: {msg}")))
}

/// `v` as a u32 kernel argument, or an error naming it.
fn to_u32(op: &str, name: &str, v: usize) -> Result<u32> {
    u32::try_from(v).or_else(|_| bad(op, format_args!("{name} = {v} does not fit in u32")))
}

/// The largest response a device-resident generation holds, and the largest patch, query or
/// gather count: the kernels' u32 index arithmetic stays far from wrapping.
pub const MAX_PROGRAM_LEN: usize = 1 << 30;

/// Marks an entry of [`DeviceState::order`] / [`DeviceState::decoded_step`] not decoded yet.
pub const UNDECODED: u32 = u32::MAX;

/// Which array of the step's uploaded plan a [`Patch`] writes. Rows are those of the program's
/// branch (the response's); keys and logits rows are the plan's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Field {
    /// `rows(branch).ids[index]`.
    RowId = 0,
    /// `rows(branch).pos[index]`.
    RowPos = 1,
    /// `rows(branch).slots[index]`.
    RowSlot = 2,
    /// `kv_indices[index]`.
    KvIndex = 3,
    /// `kv_tags[index]` (the packed [`crate::contract::Tag`]).
    KvTag = 4,
    /// `logits_rows[index]`.
    LogitsRow = 5,
    /// The sampler's position of logits row `index` (the Philox counter word 1).
    SamplePos = 6,
}

impl Field {
    /// Every field, in discriminant order.
    pub const ALL: [Field; 7] = [
        Field::RowId,
        Field::RowPos,
        Field::RowSlot,
        Field::KvIndex,
        Field::KvTag,
        Field::LogitsRow,
        Field::SamplePos,
    ];
}

/// Where a [`Patch`]'s value comes from. `arg` is the patch's argument, `add` its offset; the
/// lists `q`, `m`, `d` are those of [`Lists`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Source {
    /// `tokens[arg]`.
    Token = 0,
    /// `tokens[order[arg]]`: the token decoded with rank `arg`.
    RankToken = 1,
    /// `add + order[arg]`: the position decoded with rank `arg`.
    Rank = 2,
    /// `add + q[arg]`.
    Query = 3,
    /// `add + m[arg]`.
    Other = 4,
    /// `add + d[arg]`.
    Decoded = 5,
    /// `add + ((decoded_step[d[arg]] + 1) << 2)`: the clean tag of the group holding `d[arg]`
    /// (`add` carries the branch bit).
    DecodedTag = 6,
}

impl Source {
    /// Every source, in discriminant order.
    pub const ALL: [Source; 7] = [
        Source::Token,
        Source::RankToken,
        Source::Rank,
        Source::Query,
        Source::Other,
        Source::Decoded,
        Source::DecodedTag,
    ];
}

/// One entry of a template plan to overwrite at run time: `field[index] = value(source, arg,
/// add)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Patch {
    /// The array written.
    pub field: Field,
    /// The entry written.
    pub index: u32,
    /// Where the value comes from.
    pub source: Source,
    /// The source's argument (a response index, a rank, or a list index).
    pub arg: u32,
    /// Added to the source's value (a slot base, the prompt length, a tag's branch bit).
    pub add: u32,
}

impl Patch {
    /// The device encoding (`SlPatch` in kernels/params.h): `(field << 8 | source, index, arg,
    /// add)`.
    pub fn encode(&self) -> [u32; 4] {
        [
            ((self.field as u32) << 8) | self.source as u32,
            self.index,
            self.arg,
            self.add,
        ]
    }
}

/// What a device-resident generation knows between steps, per response index `i < n` and rank
/// `r < n` (the `r`-th position decoded over the whole generation, in commit order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// `tokens[i]`: the decoded token, or the response's `[MASK]` id while undecoded.
    pub tokens: Vec<u32>,
    /// `order[r]`: the response index decoded with rank `r`, or [`UNDECODED`].
    pub order: Vec<u32>,
    /// `decoded_step[i]`: the step that decoded `i`, or [`UNDECODED`].
    pub decoded_step: Vec<u32>,
}

impl DeviceState {
    /// Nothing decoded: every token `mask_id`.
    pub fn new(n: usize, mask_id: u32) -> DeviceState {
        DeviceState {
            tokens: vec![mask_id; n],
            order: vec![UNDECODED; n],
            decoded_step: vec![UNDECODED; n],
        }
    }

    /// Response length.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the response is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// The lists a step's patches read, computed from the state before the step (ascending
/// response indices):
/// `q` = undecoded indices in the step's block `[b0, b1)`, `m` = undecoded indices outside it,
/// `d` = decoded indices.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lists {
    /// Undecoded in the block (the text step's query, in the sampler's row order).
    pub q: Vec<u32>,
    /// Undecoded outside the block.
    pub m: Vec<u32>,
    /// Decoded.
    pub d: Vec<u32>,
}

/// How a step commits (`sl_commit`'s scalar arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitRule {
    /// The step (written to `decoded_step`).
    pub step: u32,
    /// Positions to commit (≤ the query's length).
    pub n_commit: u32,
    /// Rank of the first committed position.
    pub rank_base: u32,
    /// Highest confidence first, ties to the lower position (text); otherwise the first
    /// `n_commit` query entries in query order (t2i).
    pub by_confidence: bool,
}

impl CommitRule {
    /// The ranks the step commits: `rank_base .. rank_base + n_commit`.
    pub fn ranks(&self) -> std::ops::Range<usize> {
        let first = self.rank_base as usize;
        first..first + self.n_commit as usize
    }
}

/// The name of a patch field's target array.
pub fn field_name(f: Field) -> &'static str {
    match f {
        Field::RowId => "row_ids",
        Field::RowPos => "row_pos",
        Field::RowSlot => "row_slots",
        Field::KvIndex => "kv_indices",
        Field::KvTag => "kv_tags",
        Field::LogitsRow => "logits_rows",
        Field::SamplePos => "sample_pos",
    }
}

/// The logical lengths of the plan arrays a step's patches write: `rows` for the row fields
/// (ids, positions, slots), `keys` for the key fields, `logits` for logits rows and sampler
/// positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PatchLens {
    /// Rows of the program's branch.
    pub rows: usize,
    /// Keys.
    pub keys: usize,
    /// Logits rows (twice the sampled positions under CFG).
    pub logits: usize,
    /// Sampled positions (the sampler's rows: one per query position).
    pub samples: usize,
}

impl PatchLens {
    /// The length of `field`'s array.
    pub fn of(&self, field: Field) -> usize {
        match field {
            Field::RowId | Field::RowPos | Field::RowSlot => self.rows,
            Field::KvIndex | Field::KvTag => self.keys,
            Field::LogitsRow => self.logits,
            Field::SamplePos => self.samples,
        }
    }
}

/// Checks a step's patches against the plan's lengths: every entry written is inside its array
/// and no two patches write the same entry (the kernel applies them in parallel, so an order
/// between them would not be kept). The errors name the patch(es). This is what the safe layer
/// checks before it uploads patches; sources are not checked (one reading outside the state
/// writes nothing, on the device as in the host twin).
pub fn check_patches(patches: &[Patch], lens: PatchLens) -> Result<()> {
    let op = "patches";
    if patches.len() > MAX_PROGRAM_LEN {
        return bad(
            op,
            format_args!("{} patches exceed {MAX_PROGRAM_LEN}", patches.len()),
        );
    }
    for (name, len) in [
        ("rows", lens.rows),
        ("keys", lens.keys),
        ("logits", lens.logits),
    ] {
        to_u32(op, name, len)?;
    }
    let mut seen = std::collections::HashMap::new();
    for (k, p) in patches.iter().enumerate() {
        let len = lens.of(p.field);
        if p.index as usize >= len {
            return bad(
                op,
                format_args!(
                    "patch {k} ({p:?}) writes {}[{}], outside its {len} entries",
                    field_name(p.field),
                    p.index
                ),
            );
        }
        if let Some(first) = seen.insert((p.field, p.index), k) {
            return bad(
                op,
                format_args!(
                    "patches {first} and {k} both write {}[{}]",
                    field_name(p.field),
                    p.index
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn all_lists_every_field_and_source_in_discriminant_order() {
        for (i, f) in Field::ALL.iter().enumerate() {
            assert_eq!(*f as usize, i, "{f:?}");
        }
        for (i, s) in Source::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?}");
        }
    }

    fn patch(field: Field, index: u32) -> Patch {
        Patch {
            field,
            index,
            source: Source::Query,
            arg: 0,
            add: 0,
        }
    }

    const LENS: PatchLens = PatchLens {
        rows: 4,
        keys: 6,
        logits: 4,
        samples: 2,
    };

    #[test]
    fn patch_checks_name_the_patch() {
        let ok = [
            patch(Field::RowId, 3),
            patch(Field::RowPos, 3),
            patch(Field::RowSlot, 0),
            patch(Field::KvIndex, 5),
            patch(Field::KvTag, 5),
            patch(Field::LogitsRow, 1),
            patch(Field::SamplePos, 1),
        ];
        check_patches(&ok, LENS).unwrap();
        check_patches(&[], PatchLens::default()).unwrap();
        // Each field is bounded by its own length.
        for (p, what) in [
            (patch(Field::RowSlot, 4), "row_slots[4], outside its 4"),
            (patch(Field::KvTag, 6), "kv_tags[6], outside its 6"),
            (patch(Field::SamplePos, 2), "sample_pos[2], outside its 2"),
            (patch(Field::LogitsRow, 4), "logits_rows[4], outside its 4"),
        ] {
            let mut ps = ok.to_vec();
            ps.push(p);
            let m = msg(check_patches(&ps, LENS));
            assert!(m.contains("patch 7") && m.contains(what), "{m}");
        }
        // The same entry twice, even with different sources.
        let mut ps = ok.to_vec();
        ps.push(Patch {
            source: Source::Token,
            ..patch(Field::KvIndex, 5)
        });
        let m = msg(check_patches(&ps, LENS));
        assert!(
            m.contains("patches 3 and 7 both write kv_indices[5]"),
            "{m}"
        );
        // Same index in different fields is fine.
        check_patches(&[patch(Field::RowId, 0), patch(Field::RowPos, 0)], LENS).unwrap();
        let huge = PatchLens {
            keys: u32::MAX as usize + 1,
            ..LENS
        };
        assert!(msg(check_patches(&ok, huge)).contains("keys"));
    }
}
