//! What [`Footprint`] says a shard holds, against what loading it allocates,
//! counted by this binary's own allocator: the partition and the admission of
//! requests trust that figure, so an undercount lets a node take more layers
//! or requests than its memory holds. Both real test models, whole and split:
//! SmolLM2's Q4_1 matrices (unpacked for the CPU kernel) and untied head,
//! Gemma 3's k-quants, tied head, f32 embedding table and two rope tables.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use candle_core::Device;
use tensorlink::inference::gguf::ModelFile;
use tensorlink::inference::memory::Footprint;
use tensorlink::inference::model::ShardModel;

struct Live;

/// Bytes allocated and not yet freed, by every thread of the binary (its
/// one test runs alone).
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Live {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Live = Live;

const MIB: f64 = (1 << 20) as f64;

#[test]
fn a_shard_holds_what_its_footprint_says() {
    let models = [
        (common::model::test_model(), 30),
        (common::model::gemma3_model(), 18),
    ];
    for (model, n) in models {
        let file = ModelFile::open(&model).unwrap();
        assert_eq!(file.config().n_layers, n);
        for (start, end) in [(0, n - 1), (0, n / 2 - 1), (n / 2, n - 1)] {
            let before = LIVE.load(Ordering::Relaxed);
            let shard = ShardModel::load(&file, start, end, &Device::Cpu).unwrap();
            let held = (LIVE.load(Ordering::Relaxed) - before) as f64;
            drop(shard);
            let counted = Footprint::of(&file, start, end).weights as f64;
            println!(
                "{} layers {start}–{end}: holds {:.1} MiB, counted {:.1} MiB",
                file.display_name(),
                held / MIB,
                counted / MIB
            );
            // Within 1 MiB: the count is of tensors and tables; a shard also
            // keeps small things beside them (its config, candle's tensor
            // headers), tens of KiB. A tensor miscounted is megabytes.
            assert!(
                (counted - held).abs() <= MIB,
                "{} layers {start}–{end}: holds {:.2} MiB, counted {:.2} MiB",
                file.display_name(),
                held / MIB,
                counted / MIB
            );
        }
    }
}
