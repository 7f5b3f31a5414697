//! The kernels' tests (moved here from Candor's candle tests, so that they run with this
//! crate's optimisation level and in its own test binary).

use crate::quant::{QMatrix, supported};
use candle_core::quantized::{GgmlDType, QTensor};
use std::sync::atomic::{AtomicUsize, Ordering};

#[test]
fn q4_1_and_q8_0_matmuls_match_dequantized_f32_within_activation_rounding() {
    if !supported() {
        eprintln!("skipped: no AVX2/FMA/F16C");
        return;
    }
    let dev = candle_core::Device::Cpu;
    let (n, k) = (70, 96);
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3).collect();
    let w = candle_core::Tensor::from_vec(w, (n, k), &dev).unwrap();
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let mat = QMatrix::from_qtensor(&q).unwrap();
        let wd = q.dequantize(&dev).unwrap();
        let mut row = vec![0f32; k];
        mat.dequantize_row(3, &mut row);
        assert_eq!(row, wd.get(3).unwrap().to_vec1::<f32>().unwrap());
        for m in [1, 3, 5, 70] {
            let x: Vec<f32> = (0..m * k).map(|i| (i * 13 % 29) as f32 / 14.0 - 1.0).collect();
            let x = candle_core::Tensor::from_vec(x, (m, k), &dev).unwrap();
            let got = mat.forward(&x).unwrap();
            let want = x.matmul(&wd.t().unwrap()).unwrap();
            let err = (got.clone() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 0.02 * scale, "{dtype:?} m {m}: error {err} of {scale}");
            // Each row alone gives the same bits as in the batch.
            for r in 0..m {
                let alone = mat.forward(&x.narrow(0, r, 1).unwrap()).unwrap();
                assert_eq!(
                    alone.get(0).unwrap().to_vec1::<f32>().unwrap(),
                    got.get(r).unwrap().to_vec1::<f32>().unwrap()
                );
            }
        }
    }
}

#[test]
fn every_item_runs_once_whoever_calls() {
    let callers: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for n in [0, 1, 7, 100, 1000 + t] {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    crate::pool::run(n, |r| {
                        for i in r {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                            // Nested calls run inline.
                            crate::pool::run(2, |_| {});
                        }
                    });
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                }
            })
        })
        .collect();
    callers.into_iter().for_each(|c| c.join().unwrap());
}
