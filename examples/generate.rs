//! Greedy generation on one process, all layers, no network: the reference the
//! llama.cpp comparison (`scripts/compare-llamacpp`) reads, and a quick way to
//! see what a model file does.
//!
//!   cargo run --release --example generate -- --model M.gguf --chat "Hello" --n 32
//!
//! Prints JSON: the rendered prompt, its token ids, the greedy continuation
//! (stopping at end of generation), its text, and the first position's logits.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use serde_json::json;
use tensorlink::inference::cache::LayerCache;
use tensorlink::inference::chat::{ChatMessage, ChatTemplate};
use tensorlink::inference::gguf::ModelFile;
use tensorlink::inference::model::{ShardModel, ShardOutput};
use tensorlink::inference::sampler::argmax;
use tensorlink::inference::tokenizer::ModelTokenizer;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    /// A user message, wrapped in the model's chat template.
    #[arg(long, conflicts_with = "prompt")]
    chat: Option<String>,
    /// Raw prompt text, tokenized as is (special tokens parsed).
    #[arg(long)]
    prompt: Option<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    n: usize,
    /// Also print every logit of the first generated position.
    #[arg(long)]
    all_logits: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let file = ModelFile::open(&args.model)?;
    let tokenizer = ModelTokenizer::from_gguf(file.metadata())?;
    let text = match (&args.chat, &args.prompt) {
        (Some(user), _) => ChatTemplate::from_gguf(file.metadata(), &tokenizer)?
            .context("the model has no chat template")?
            .render(&[ChatMessage {
                role: "user".into(),
                content: user.clone(),
            }])?,
        (None, Some(p)) => p.clone(),
        (None, None) => bail!("give --chat or --prompt"),
    };
    let prompt = tokenizer.encode(&text)?;
    let n_layers = file.config().n_layers;
    let model = ShardModel::load(&file, 0, n_layers - 1, &Device::Cpu)?;
    let reach = prompt.len() + args.n;
    let mut cache: Vec<LayerCache> = (0..n_layers).map(|_| LayerCache::new(reach)).collect();

    let mut input = prompt.clone();
    let mut position = 0;
    let mut generated = Vec::new();
    let mut first_logits: Vec<f32> = Vec::new();
    while generated.len() < args.n {
        let x = candle_core::Tensor::new(input.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let ShardOutput::Logits(logits) = model.forward(&x, position, &mut cache)? else {
            bail!("a model with every layer ends in logits");
        };
        let logits: Vec<f32> = logits.to_vec1()?;
        if first_logits.is_empty() {
            first_logits = logits.clone();
        }
        position += input.len();
        let token = argmax(&logits);
        generated.push(token);
        if tokenizer.is_end_of_generation(token) {
            break;
        }
        input = vec![token];
    }
    let mut top: Vec<(usize, f32)> = first_logits.iter().copied().enumerate().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top.truncate(10);
    let mut out = json!({
        "prompt_text": text,
        "prompt_tokens": prompt,
        "greedy": generated,
        "text": tokenizer.decode(&generated)?,
        "first_logits_top": top,
    });
    if args.all_logits {
        out["first_logits_all"] = json!(first_logits);
    }
    println!("{out}");
    Ok(())
}
