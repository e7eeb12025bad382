"""Model bundles shipped with kdjax (see README.md in this folder for how each was made)."""

import pathlib

ROOT = pathlib.Path(__file__).parent
DIGITS32_TEACHER = ROOT / "digits32" / "teacher"  # StyleGAN2 generator (EMA), 32x32x1, trained on `digits`
DIGITS32_JUDGE = ROOT / "digits32" / "judge"  # ResNet classifier of the digits at 32x32x1 (FID features, KL, perceptual)
DIGITS32_DIFFUSION = ROOT / "digits32" / "diffusion"  # EDM U-Net denoiser (EMA) of the digits at 32x32x1
DIGITS8_PIXELCNN = ROOT / "digits8" / "pixelcnn_teacher"  # gated PixelCNN of the digits at 8x8, 17 levels
DIGITS32_VQVAE = ROOT / "digits32" / "vqvae"  # VQ-VAE of the digits at 32x32x1: 8x8 grid of 32 codes
DIGITS32_VQ_PRIOR = ROOT / "digits32" / "vqvae_prior_teacher"  # gated PixelCNN over DIGITS32_VQVAE's codes
PHOTOS_EDSR_X2 = ROOT / "photos" / "edsr_x2"  # EDSR x2 super-resolution of RGB photographs (scikit-image's)
PHOTOS_UNET_INPAINT = ROOT / "photos" / "unet_inpaint"  # U-Net for free-form (stroke) inpainting of RGB photographs
PHOTOS_UNET_DENOISE = ROOT / "photos" / "unet_denoise"  # U-Net denoising RGB photographs (Gaussian, sigma 25)
PHOTOS_VAE = ROOT / "photos" / "vae"  # KL-regularised VAE of RGB photographs: factor 4, 4 latent channels
