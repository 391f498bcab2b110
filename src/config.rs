//! Model configuration (SPEC §2.1): the JSON schema, validation and the named presets.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The two residual streams of the Elastic Mixture-of-Transformers.
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
        Ok(())
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

    /// Every weight tensor with its shape, in a fixed order (SPEC §2.2 names).
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

    /// Total parameter count.
    pub fn param_count(&self) -> u64 {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }
}

/// Bytes of memory this machine can still give (Linux `MemAvailable`), if known.
pub fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses a run needing `needed` bytes when the machine has less available.
pub fn ensure_fits(what: &str, needed: u64) -> Result<()> {
    if let Some(avail) = available_memory_bytes()
        && needed > avail
    {
        return Err(Error::OutOfMemory(format!(
            "{what} needs {:.1} GB but only {:.1} GB is available",
            needed as f64 / 1e9,
            avail as f64 / 1e9
        )));
    }
    Ok(())
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
