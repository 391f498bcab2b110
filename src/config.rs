//! Model configuration (SPEC §2.1): the JSON schema, validation and the named presets.

pub use crate::contract::Branch;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Hyper-parameters of a LaViDa-O-shaped model. Every field is required in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Residual width of the text branch.
    pub d_text: usize,
    /// Residual width of the image branch.
    pub d_image: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head; must be even (RoPE rotates pairs).
    pub head_dim: usize,
    /// SwiGLU inner width of the text branch.
    pub mlp_text: usize,
    /// SwiGLU inner width of the image branch.
    pub mlp_image: usize,
    /// Transformer layers.
    pub n_layers: usize,
    /// Layers `< n_joint_layers` attend across branches; later ones within a branch.
    pub n_joint_layers: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Text embedding rows and text head width.
    pub text_vocab: usize,
    /// Id of the text `[MASK]` token.
    pub text_mask_id: u32,
    /// Image codes; the image `[MASK]` is id `image_vocab`.
    pub image_vocab: usize,
    /// Register tokens per masked block.
    pub n_registers: usize,
}

/// Names accepted by [`Config::preset`].
pub const PRESETS: [&str; 3] = ["tiny", "small", "lavida-o"];

impl Config {
    /// A named preset: `tiny` (tests), `small` (CPU demo) or `lavida-o` (the real shape).
    pub fn preset(name: &str) -> Result<Config> {
        let c = match name {
            "tiny" => Config {
                d_text: 64,
                d_image: 32,
                n_heads: 4,
                n_kv_heads: 4,
                head_dim: 16,
                mlp_text: 128,
                mlp_image: 64,
                n_layers: 4,
                n_joint_layers: 2,
                rope_theta: 10000.0,
                norm_eps: 1e-5,
                text_vocab: 300,
                text_mask_id: 299,
                image_vocab: 64,
                n_registers: 8,
            },
            "small" => Config {
                d_text: 256,
                d_image: 128,
                n_heads: 4,
                n_kv_heads: 4,
                head_dim: 64,
                mlp_text: 768,
                mlp_image: 384,
                n_layers: 6,
                n_joint_layers: 3,
                rope_theta: 10000.0,
                norm_eps: 1e-5,
                text_vocab: 2048,
                text_mask_id: 2047,
                image_vocab: 512,
                n_registers: 16,
            },
            "lavida-o" => Config {
                d_text: 4096,
                d_image: 2048,
                n_heads: 32,
                n_kv_heads: 32,
                head_dim: 128,
                mlp_text: 12288,
                mlp_image: 8192,
                n_layers: 32,
                n_joint_layers: 16,
                rope_theta: 500000.0,
                norm_eps: 1e-5,
                text_vocab: 127378,
                text_mask_id: 126336,
                image_vocab: 8192,
                n_registers: 64,
            },
            other => {
                return Err(Error::Config(format!(
                    "unknown preset `{other}` (known: {})",
                    PRESETS.join(", ")
                )));
            }
        };
        Ok(c)
    }

    /// Parses and validates a JSON config.
    pub fn from_json(text: &str) -> Result<Config> {
        let c: Config = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Reads, parses and validates a JSON config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Config::from_json(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Checks every field and every cross-field constraint; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("d_text", self.d_text),
            ("d_image", self.d_image),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("mlp_text", self.mlp_text),
            ("mlp_image", self.mlp_image),
            ("n_layers", self.n_layers),
            ("text_vocab", self.text_vocab),
            ("image_vocab", self.image_vocab),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(Error::Config(format!(
                "n_heads ({}) must be a multiple of n_kv_heads ({})",
                self.n_heads, self.n_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "head_dim ({}) must be even: RoPE rotates pairs",
                self.head_dim
            )));
        }
        if self.n_joint_layers > self.n_layers {
            return Err(Error::Config(format!(
                "n_joint_layers ({}) exceeds n_layers ({})",
                self.n_joint_layers, self.n_layers
            )));
        }
        if self.text_mask_id as usize >= self.text_vocab {
            return Err(Error::Config(format!(
                "text_mask_id ({}) must be < text_vocab ({})",
                self.text_mask_id, self.text_vocab
            )));
        }
        if self.text_vocab > u32::MAX as usize / 2 || self.image_vocab > u32::MAX as usize / 2 {
            return Err(Error::Config("vocabularies must fit in 31 bits".into()));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(Error::Config(format!(
                "rope_theta ({}) must be finite and > 1",
                self.rope_theta
            )));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::Config(format!(
                "norm_eps ({}) must be finite and > 0",
                self.norm_eps
            )));
        }
        // Sizes in checked arithmetic: after this, every size helper below is exact.
        self.try_param_count()?;
        Ok(())
    }

    /// Total parameter count in checked arithmetic, from the widths alone (no tensor list is
    /// built, so a config of 10¹² layers is answered at once). [`Error::Config`] naming the
    /// product that overflows 64 bits.
    pub fn try_param_count(&self) -> Result<u64> {
        let over = |what: &str| {
            Error::Config(format!(
                "{what} overflows 64-bit arithmetic: the config is far too large for any machine"
            ))
        };
        let mul = |a: usize, b: usize, what: &str| {
            (a as u64).checked_mul(b as u64).ok_or_else(|| over(what))
        };
        let sum = |parts: &[u64], what: &str| {
            parts
                .iter()
                .try_fold(0u64, |acc, &p| acc.checked_add(p))
                .ok_or_else(|| over(what))
        };
        let attn = mul(self.n_heads, self.head_dim, "n_heads × head_dim")?;
        let kv = mul(self.n_kv_heads, self.head_dim, "n_kv_heads × head_dim")?;
        if usize::try_from(attn.max(kv)).is_err() {
            return Err(over("n_heads × head_dim"));
        }
        let mut fixed = 0u64;
        let mut per_layer = 0u64;
        for b in Branch::ALL {
            let (n, d, f) = (b.name(), self.d_model(b), self.d_mlp(b));
            let rows = (self.vocab(b) as u64).checked_add(u64::from(b == Branch::Image));
            let rows = rows.ok_or_else(|| over("image_vocab + 1"))?;
            let embed = mul(rows as usize, d, &format!("{n}.embed"))?;
            let head = mul(self.vocab(b), d, &format!("{n}.head"))?;
            let a = (attn as usize, kv as usize);
            let layer = sum(
                &[
                    mul(2, d, &format!("{n} norms"))?,
                    mul(a.0, d, &format!("layers.*.{n}.q"))?,
                    mul(a.1, d, &format!("layers.*.{n}.k"))?,
                    mul(a.1, d, &format!("layers.*.{n}.v"))?,
                    mul(d, a.0, &format!("layers.*.{n}.o"))?,
                    mul(
                        3,
                        mul(f, d, &format!("layers.*.{n}.gate"))? as usize,
                        "SwiGLU",
                    )?,
                ],
                &format!("one {n} layer"),
            )?;
            fixed = sum(
                &[fixed, embed, head, mul(2, d, "norms")?],
                "the parameter count",
            )?;
            per_layer = sum(&[per_layer, layer], "one layer")?;
        }
        let layers = mul(self.n_layers, per_layer as usize, "n_layers × one layer")?;
        sum(&[fixed, layers], "the parameter count")
    }

    /// Residual width of `b`.
    pub fn d_model(&self, b: Branch) -> usize {
        match b {
            Branch::Text => self.d_text,
            Branch::Image => self.d_image,
        }
    }

    /// SwiGLU inner width of `b`.
    pub fn d_mlp(&self, b: Branch) -> usize {
        match b {
            Branch::Text => self.mlp_text,
            Branch::Image => self.mlp_image,
        }
    }

    /// Embedding rows of `b` (the image table has one extra row for its `[MASK]`).
    pub fn embed_rows(&self, b: Branch) -> usize {
        match b {
            Branch::Text => self.text_vocab,
            Branch::Image => self.image_vocab + 1,
        }
    }

    /// Logit width of `b`.
    pub fn vocab(&self, b: Branch) -> usize {
        match b {
            Branch::Text => self.text_vocab,
            Branch::Image => self.image_vocab,
        }
    }

    /// The `[MASK]` id of `b`.
    pub fn mask_id(&self, b: Branch) -> u32 {
        match b {
            Branch::Text => self.text_mask_id,
            Branch::Image => self.image_vocab as u32,
        }
    }

    /// Attention width `n_heads * head_dim` (query and output space, shared by both branches).
    pub fn attn_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Key/value width `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Every weight tensor with its shape, in a fixed order (SPEC §2.2 names). Allocates one
    /// entry per tensor ([`Config::tensor_count`]): bound the config's memory first (a
    /// validated config may still be far too large for the machine; the memory module bounds
    /// it).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for b in Branch::ALL {
            let (n, d) = (b.name(), self.d_model(b));
            out.push((format!("{n}.embed"), vec![self.embed_rows(b), d]));
            out.push((format!("{n}.register"), vec![d]));
            out.push((format!("{n}.final_norm"), vec![d]));
            out.push((format!("{n}.head"), vec![self.vocab(b), d]));
        }
        for i in 0..self.n_layers {
            for b in Branch::ALL {
                let (n, d, f) = (b.name(), self.d_model(b), self.d_mlp(b));
                let p = format!("layers.{i}.{n}");
                out.push((format!("{p}.attn_norm"), vec![d]));
                out.push((format!("{p}.q"), vec![self.attn_dim(), d]));
                out.push((format!("{p}.k"), vec![self.kv_dim(), d]));
                out.push((format!("{p}.v"), vec![self.kv_dim(), d]));
                out.push((format!("{p}.o"), vec![d, self.attn_dim()]));
                out.push((format!("{p}.ffn_norm"), vec![d]));
                out.push((format!("{p}.gate"), vec![f, d]));
                out.push((format!("{p}.up"), vec![f, d]));
                out.push((format!("{p}.down"), vec![d, f]));
            }
        }
        out
    }

    /// Total parameter count, from the widths (O(1), no tensor list). Exact for a validated
    /// config; saturates at `u64::MAX` for one whose sizes overflow ([`Config::try_param_count`]
    /// says which).
    pub fn param_count(&self) -> u64 {
        self.try_param_count().unwrap_or(u64::MAX)
    }

    /// Number of weight tensors: 4 per branch plus 9 per branch and layer (saturating).
    pub fn tensor_count(&self) -> u64 {
        (self.n_layers as u64).saturating_mul(18).saturating_add(8)
    }

    /// Elements of the largest weight tensor (saturating), for memory bounds of code that
    /// holds one tensor at a time.
    pub fn largest_tensor(&self) -> u64 {
        let m = |a: usize, b: usize| (a as u64).saturating_mul(b as u64);
        Branch::ALL
            .into_iter()
            .flat_map(|b| {
                let (d, f) = (self.d_model(b), self.d_mlp(b));
                let attn = m(self.n_heads, self.head_dim).min(usize::MAX as u64) as usize;
                [
                    m(self.vocab(b), d).saturating_add(d as u64),
                    m(attn, d),
                    m(f, d),
                ]
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_lavida_o_has_10b_parameters() {
        for p in PRESETS {
            Config::preset(p).unwrap().validate().unwrap();
        }
        let n = Config::preset("lavida-o").unwrap().param_count();
        assert!((10.0e9..11.0e9).contains(&(n as f64)), "{n}");
    }

    #[test]
    fn json_round_trip_and_field_errors() {
        let c = Config::preset("tiny").unwrap();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(Config::from_json(&text).unwrap(), c);

        let mut bad = c.clone();
        bad.n_kv_heads = 3;
        let e = Config::from_json(&serde_json::to_string(&bad).unwrap()).unwrap_err();
        assert!(e.to_string().contains("n_kv_heads"), "{e}");

        let mut bad = c.clone();
        bad.text_mask_id = 300;
        let e = Config::from_json(&serde_json::to_string(&bad).unwrap()).unwrap_err();
        assert!(e.to_string().contains("text_mask_id"), "{e}");

        let e = Config::from_json(&text.replace("\"d_text\":64,", "")).unwrap_err();
        assert!(e.to_string().contains("d_text"), "{e}");
        let e = Config::from_json(&text.replace("\"d_text\"", "\"d_txt\"")).unwrap_err();
        assert!(e.to_string().contains("d_txt"), "{e}");
        assert!(
            Config::preset("huge")
                .unwrap_err()
                .to_string()
                .contains("huge")
        );
    }
}
