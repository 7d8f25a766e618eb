"""Training beside the compile pipeline: the single-process trainers of learned masks and low-bit adapters
(``learn-masks``, ``train-adapter``), and ``redux-edge train``, which runs compression recipes (SHRP
routing, MaskLLM masks, adapters, recovery) on many processes through torch.distributed with ZeRO."""
