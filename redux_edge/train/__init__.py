"""Training that runs beside the compile pipeline: learned sparsity masks (and, later, recovery
fine-tuning with ZeRO). Trainers are plain torch modules and loops without global state, so that a
distributed launcher can run them sharded."""
