"""The training engine shared by pretraining and fine-tuning: resumable sampling
(``sampling``), optimizers and lr schedules (``optim``), crash-safe checkpoints and RNG state
(``checkpoint``), torch.distributed helpers (``distributed``), stop/checkpoint requests from
signals (``signals``) and the one generic loop (``loop``).

Determinism contract (CPU, fixed seed): the batch at step ``s`` is a pure function of
(seed, s); every RNG the step touches is saved in the checkpoint. A run stopped after
step k and resumed ends with exactly the weights of an uninterrupted run."""
