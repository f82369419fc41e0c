"""One folder per unlearning method: its LightningModule, its plain-torch maths and a README
that points to its config and its guide.

- ``vdu/``: Variational Diffusion Unlearning (docs/method.md §2).
- ``peers/``: the methods VDU is compared with (docs/method.md §7).
- ``sfd/``: Score Forgetting Distillation into a one-step generator (docs/method.md §6).
- ``text_to_image/``: VDU and fine-tuning on Stable-Diffusion-style pipelines (docs/method.md §5).
"""
