//! The model file as a shard reads it: a tensor copied out in runs is the
//! bytes candle's own GGUF reader gives, and a file cut short (a copy still
//! under way) is refused at open, before anything hashes it.

mod common;

use std::io::Write;

use candle_core::Device;
use tensorlink::inference::gguf::ModelFile;

#[test]
fn a_tensor_read_in_runs_is_what_candles_reader_gives() {
    let file = ModelFile::open(&common::model::test_model()).unwrap();
    // SmolLM2's embedding table: Q8_0, 28.7 MiB, so several 8 MiB runs and
    // a short last one.
    let name = "token_embd.weight";
    let theirs = file
        .tensor(name, &Device::Cpu)
        .unwrap()
        .data()
        .unwrap()
        .to_vec();
    assert!(theirs.len() > 3 * (8 << 20) && theirs.len() % (8 << 20) != 0);
    let mut ours = vec![0u8; theirs.len()];
    file.read_into(name, &mut ours).unwrap();
    assert!(ours == theirs, "the bytes differ");
    let err = file
        .read_into(name, &mut ours[1..])
        .unwrap_err()
        .to_string();
    assert!(err.contains(name) && err.contains("bytes"), "{err}");
    let err = file
        .read_into("blk.99.ffn_up.weight", &mut ours)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no tensor `blk.99.ffn_up.weight`"), "{err}");
}

#[test]
fn a_file_cut_short_is_refused_at_open_naming_what_is_missing() {
    let whole = std::fs::read(common::model::test_model()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&whole[..whole.len() - 4096])
        .unwrap();
    let err = ModelFile::open(&path).err().expect("refused").to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("cut short"),
        "{err}"
    );
}
