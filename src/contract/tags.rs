//! Row and key tags (SPEC §3) exactly as the kernels read them: the branch, the packed
//! [`Tag`], the [`REGISTER`] id and the [`visible`] rule every attention implementation obeys.

use serde::{Deserialize, Serialize};

/// The two residual streams of the Elastic Mixture-of-Transformers. Its discriminant is the
/// branch bit of a [`Tag`] (and `SlAggregateParams::branch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Branch {
    /// Text branch (prompt, text answers).
    Text = 0,
    /// Image branch (image codes, text-to-image responses).
    Image = 1,
}

impl Branch {
    /// Both branches, in storage order.
    pub const ALL: [Branch; 2] = [Branch::Text, Branch::Image];

    /// The weight-name prefix (`text` / `image`).
    pub fn name(self) -> &'static str {
        match self {
            Branch::Text => "text",
            Branch::Image => "image",
        }
    }

    /// The other branch.
    pub fn other(self) -> Branch {
        match self {
            Branch::Text => Branch::Image,
            Branch::Image => Branch::Text,
        }
    }
}

/// The token id that stands for a register row (its embedding is `{branch}.register`):
/// `SL_REGISTER` of `kernels/params.h`.
pub const REGISTER: u32 = u32::MAX;

/// Largest block number a [`Tag`] can hold.
pub const MAX_BLOCK: u32 = (1 << 30) - 1;

/// Attention tag of a row or key, packed in one `u32` exactly as the CUDA kernels read it:
/// bit 0 = masked, bit 1 = branch (1 = image), bits 2..32 = block.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Tag(pub u32);

impl Tag {
    /// Packs a tag; `block` must be at most [`MAX_BLOCK`].
    pub fn new(branch: Branch, block: u32, masked: bool) -> Tag {
        debug_assert!(block <= MAX_BLOCK);
        Tag((block << 2) | ((branch as u32) << 1) | masked as u32)
    }

    /// The row's branch.
    pub fn branch(self) -> Branch {
        if self.0 & 2 != 0 {
            Branch::Image
        } else {
            Branch::Text
        }
    }

    /// The row's block (clean block number, or the id of its masked block).
    pub fn block(self) -> u32 {
        self.0 >> 2
    }

    /// Whether the row belongs to a masked block (a mask being decoded, or a register).
    pub fn masked(self) -> bool {
        self.0 & 1 != 0
    }
}

impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tag({:?}, block {}{})",
            self.branch(),
            self.block(),
            if self.masked() { ", masked" } else { "" }
        )
    }
}

/// SPEC §3: may a query tagged `q` attend to a key tagged `k` in a layer that is `joint`
/// (cross-branch) or not?
#[inline]
pub fn visible(q: Tag, k: Tag, joint: bool) -> bool {
    let branch_ok = joint || q.branch() == k.branch();
    let step_ok = if q.masked() {
        !k.masked() || k.block() == q.block()
    } else {
        !k.masked() && k.block() <= q.block()
    };
    branch_ok && step_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_round_trips_and_rule_matches_spec() {
        let t = Tag::new(Branch::Image, 12345, true);
        assert_eq!(
            (t.branch(), t.block(), t.masked()),
            (Branch::Image, 12345, true)
        );
        let clean = |b| Tag::new(Branch::Text, b, false);
        let masked = |b| Tag::new(Branch::Text, b, true);
        assert!(visible(clean(2), clean(1), true));
        assert!(visible(clean(2), clean(2), true));
        assert!(!visible(clean(1), clean(2), true));
        assert!(!visible(clean(5), masked(1), true));
        assert!(visible(masked(3), clean(9), true));
        assert!(visible(masked(3), masked(3), true));
        assert!(!visible(masked(3), masked(4), true));
        let img = Tag::new(Branch::Image, 0, false);
        assert!(visible(img, clean(0), true));
        assert!(!visible(img, clean(0), false));
    }
}
