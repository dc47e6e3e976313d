"""``stadi train``: small text-to-image models of the project's families trained from scratch on images that ship
inside installable packages (``data``): first the VAE (``vae``), then the text encoders and the denoiser together
(``denoiser``), written as a diffusers checkpoint (``run``)."""
