"""The light config package: config blocks (`blocks`), a config file's argument (`args`), and the paths of
the shipped model bundles. It imports ml_collections only, so a config file costs no JAX import; configs in
`configs/` import nothing else from kdjax."""

from kdjax.config.args import apply_arg
from kdjax.config.blocks import (DISTILL_TERMS, data_config, degradation_config, distill_config, gan_config,
                                 optimizer_config, phase_train_config, photos_data_config, run_config,
                                 sample_eval_config, vqvae_config)
from kdjax.pretrained import (DIGITS8_PIXELCNN, DIGITS32_DIFFUSION, DIGITS32_JUDGE, DIGITS32_TEACHER,
                              DIGITS32_VQ_PRIOR, DIGITS32_VQVAE, PHOTOS_EDSR_X2, PHOTOS_UNET_DENOISE, PHOTOS_UNET_INPAINT, PHOTOS_VAE)

__all__ = ["DIGITS8_PIXELCNN", "DIGITS32_DIFFUSION", "DIGITS32_JUDGE", "DIGITS32_TEACHER", "DIGITS32_VQ_PRIOR",
           "DIGITS32_VQVAE",
           "PHOTOS_EDSR_X2", "PHOTOS_UNET_DENOISE", "PHOTOS_UNET_INPAINT", "PHOTOS_VAE",
           "DISTILL_TERMS", "apply_arg", "data_config",
           "degradation_config", "distill_config",
           "gan_config", "optimizer_config", "phase_train_config", "photos_data_config", "run_config",
           "sample_eval_config", "vqvae_config"]
