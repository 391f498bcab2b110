//! A picture of a text-to-image generation (`--image FILE.png`): what the sampler did, drawn
//! from its trace, since the token ids themselves are not an image.
//!
//! The response of a t2i generation is `H × W` image codes of a VQ tokenizer, row-major over the
//! grid; turning them into pixels needs that tokenizer's decoder, which is outside this crate.
//! The picture shows instead, side by side at the same scale:
//! - left, the **decode step** of every grid cell (viridis: dark purple = step 0, yellow = the
//!   last step), where the stratified order's spread and the shift schedule's growth are seen;
//! - right, the **token id** chosen for every cell (a hue wheel over `0..vocab`).
//!
//! Each cell is a `scale × scale` square ([`PictureLayout`]); the panels are separated by a
//! white gap. The PNG's `Description` text chunk states all this with the grid's shape.

use crate::error::{Error, Result};
use crate::sampler::StepTrace;
use std::path::Path;

/// Pixel geometry of a picture of an `H × W` grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PictureLayout {
    /// Pixels per cell side: `256 / max(H, W)` clamped to `1..=16`, so small grids are
    /// legible and large ones stay one pixel per cell.
    pub scale: usize,
    /// White pixels between the two panels.
    pub gap: usize,
    /// `2·W·scale + gap`.
    pub width_px: usize,
    /// `H·scale`.
    pub height_px: usize,
}

impl PictureLayout {
    /// The layout of an `h × w` grid; [`Error::Input`] for an empty grid or one whose picture
    /// would not fit a PNG's 32-bit sides.
    pub fn of(h: usize, w: usize) -> Result<PictureLayout> {
        if h == 0 || w == 0 {
            return Err(Error::Input(format!("picture of a zero-size grid {h}x{w}")));
        }
        let scale = (256 / h.max(w)).clamp(1, 16);
        let gap = scale.max(4);
        let width_px = w
            .checked_mul(2 * scale)
            .and_then(|v| v.checked_add(gap))
            .filter(|&v| v <= u32::MAX as usize);
        let height_px = h.checked_mul(scale).filter(|&v| v <= u32::MAX as usize);
        match (width_px, height_px) {
            (Some(width_px), Some(height_px)) => Ok(PictureLayout {
                scale,
                gap,
                width_px,
                height_px,
            }),
            _ => Err(Error::Input(format!(
                "a picture of grid {h}x{w} exceeds the 2^32-pixel sides of a PNG"
            ))),
        }
    }

    /// Pixels of the picture (saturating), for memory bounds.
    pub fn pixels(&self) -> u64 {
        (self.width_px as u64).saturating_mul(self.height_px as u64)
    }
}

/// What the picture shows: per grid cell (row-major), the step that decoded it and its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GridPicture {
    /// Grid height `H`.
    pub height: usize,
    /// Grid width `W`.
    pub width: usize,
    /// Steps of the generation.
    pub steps: usize,
    /// The image vocabulary (token ids are below it).
    pub vocab: usize,
    /// Decode step of each cell.
    pub decode_step: Vec<u32>,
    /// Token id of each cell.
    pub tokens: Vec<u32>,
}

impl GridPicture {
    /// Collects the picture from a generation's steps: every cell of the `height × width` grid
    /// decoded exactly once, every token below `vocab`; otherwise [`Error::Input`] naming the
    /// step and the position.
    pub fn from_steps(
        height: usize,
        width: usize,
        vocab: usize,
        steps: &[(Vec<u32>, Vec<u32>)],
    ) -> Result<GridPicture> {
        // The layout checked that the picture, hence the grid, fits in memory-sized numbers.
        PictureLayout::of(height, width)?;
        let cells = height * width;
        let mut decode_step = vec![u32::MAX; cells];
        let mut tokens = vec![0u32; cells];
        let bad = |m: String| Err(Error::Input(format!("picture: {m}")));
        for (k, (positions, ids)) in steps.iter().enumerate() {
            if positions.len() != ids.len() {
                return bad(format!(
                    "step {k} lists {} positions but {} tokens",
                    positions.len(),
                    ids.len()
                ));
            }
            for (&i, &id) in positions.iter().zip(ids) {
                let Some(slot) = decode_step.get_mut(i as usize) else {
                    return bad(format!(
                        "step {k} decodes position {i}, outside the {height}x{width} grid"
                    ));
                };
                if *slot != u32::MAX {
                    return bad(format!(
                        "position {i} is decoded twice (steps {} and {k})",
                        *slot
                    ));
                }
                if id as usize >= vocab {
                    return bad(format!(
                        "step {k} chose token {id} at {i}, outside the vocabulary (0..{vocab})"
                    ));
                }
                *slot = k as u32;
                tokens[i as usize] = id;
            }
        }
        if let Some(i) = decode_step.iter().position(|&s| s == u32::MAX) {
            return bad(format!("position {i} is never decoded"));
        }
        Ok(GridPicture {
            height,
            width,
            steps: steps.len(),
            vocab,
            decode_step,
            tokens,
        })
    }

    /// [`GridPicture::from_steps`] over a generation's step traces.
    pub fn from_trace(
        height: usize,
        width: usize,
        vocab: usize,
        steps: &[StepTrace],
    ) -> Result<GridPicture> {
        let steps: Vec<(Vec<u32>, Vec<u32>)> = steps
            .iter()
            .map(|s| (s.decoded_positions.clone(), s.tokens.clone()))
            .collect();
        Self::from_steps(height, width, vocab, &steps)
    }

    /// Reads a `generate --trace` file of a t2i run (it records `grid`, `vocab` and each step's
    /// `decoded_positions` and `tokens`).
    pub fn from_trace_file(path: &Path) -> Result<GridPicture> {
        #[derive(serde::Deserialize)]
        struct Step {
            decoded_positions: Vec<u32>,
            tokens: Vec<u32>,
        }
        #[derive(serde::Deserialize)]
        struct Trace {
            grid: Option<[usize; 2]>,
            vocab: Option<usize>,
            steps: Vec<Step>,
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let trace: Trace = serde_json::from_str(&text).map_err(|e| Error::Json {
            context: format!("trace {}", path.display()),
            source: e,
        })?;
        let (Some([h, w]), Some(vocab)) = (trace.grid, trace.vocab) else {
            return Err(Error::Input(format!(
                "{}: not the trace of a t2i generation (no `grid` and `vocab`)",
                path.display()
            )));
        };
        let steps: Vec<(Vec<u32>, Vec<u32>)> = trace
            .steps
            .into_iter()
            .map(|s| (s.decoded_positions, s.tokens))
            .collect();
        Self::from_steps(h, w, vocab, &steps)
    }

    /// The colour of decode step `k` (viridis over `0..steps`).
    pub fn step_colour(&self, k: u32) -> [u8; 3] {
        viridis(k as f64 / (self.steps.max(2) - 1) as f64)
    }

    /// The colour of token `id` (a hue wheel over `0..vocab`).
    pub fn token_colour(&self, id: u32) -> [u8; 3] {
        hue(id as f64 / self.vocab.max(1) as f64)
    }

    /// The picture as 8-bit RGB rows, top to bottom ([`PictureLayout`]).
    pub fn rgb(&self) -> Result<(PictureLayout, Vec<u8>)> {
        let l = PictureLayout::of(self.height, self.width)?;
        let mut px = vec![255u8; l.width_px * l.height_px * 3];
        let right = self.width * l.scale + l.gap;
        for y in 0..l.height_px {
            let row = &mut px[y * l.width_px * 3..][..l.width_px * 3];
            for x in 0..self.width * l.scale {
                let cell = (y / l.scale) * self.width + x / l.scale;
                row[x * 3..][..3].copy_from_slice(&self.step_colour(self.decode_step[cell]));
                row[(right + x) * 3..][..3].copy_from_slice(&self.token_colour(self.tokens[cell]));
            }
        }
        Ok((l, px))
    }

    /// Writes the picture as a PNG (atomically, [`crate::io::write_atomic`]).
    pub fn write_png(&self, path: &Path) -> Result<()> {
        let (l, px) = self.rgb()?;
        let describe = format!(
            "sparse-lavida t2i generation, grid {}x{} (image codes, row-major), {} steps. \
             Left: decode step of each cell (viridis, dark = step 0, yellow = step {}). Right: \
             token id of each cell (hue over 0..{}). {} px per cell, {} px gap. Decoding the \
             ids to pixels needs the VQ tokenizer's decoder.",
            self.height,
            self.width,
            self.steps,
            self.steps.saturating_sub(1),
            self.vocab,
            l.scale,
            l.gap
        );
        let png_err = |e: png::EncodingError| match e {
            png::EncodingError::IoError(io) => Error::io(path, io),
            e => Error::Input(format!("{}: PNG encoding: {e}", path.display())),
        };
        crate::io::write_atomic(path, |w| {
            let mut enc = png::Encoder::new(w, l.width_px as u32, l.height_px as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.add_text_chunk("Description".into(), describe)
                .map_err(png_err)?;
            let mut writer = enc.write_header().map_err(png_err)?;
            writer.write_image_data(&px).map_err(png_err)?;
            writer.finish().map_err(png_err)
        })
    }
}

/// Viridis, piecewise linear through five of its stops; `t` in `[0, 1]`.
fn viridis(t: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let x = t.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let mix = |c: usize| (STOPS[i][c] + f * (STOPS[i + 1][c] - STOPS[i][c])).round() as u8;
    [mix(0), mix(1), mix(2)]
}

/// A bright colour of hue `300°·t` (`t` in `[0, 1)`; red to magenta, so the ends differ).
fn hue(t: f64) -> [u8; 3] {
    let h = t.clamp(0.0, 1.0) * 5.0;
    let (v, s) = (0.95, 0.85);
    let f = h - h.floor();
    let (p, q, u) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match h.floor() as u32 {
        0 => (v, u, p),
        1 => (q, v, p),
        2 => (p, v, u),
        3 => (p, q, v),
        4 => (u, p, v),
        _ => (v, p, q),
    };
    [r, g, b].map(|c| (c * 255.0).round() as u8)
}
