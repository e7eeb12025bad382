"""Evaluation library: metrics for generators and classifiers, each on arrays, each testable alone.

Modules (import the one you need; this package imports nothing heavy):
- `features`: run a feature function over images or latents in batches, sharded across all devices.
- `inception`: the FID InceptionV3 (pytorch-fid variant) in Flax, and a loader for its weights file.
- `fid`: streaming float64 feature statistics, Frechet distance, FID and KID.
- `prdc`: precision/recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al. 2020).
- `fidelity`: teacher-student fidelity on identical latents: PSNR, SSIM, L1, perceptual distance.
- `spectrum`: radially averaged power spectra, the spectral distance between two, and their plot.
- `diversity`: mean pairwise perceptual distance within a batch of generated images.
- `classification`: accuracy, macro-F1 and expected calibration error.

Every figure comes with the number of samples it was computed on.
"""
