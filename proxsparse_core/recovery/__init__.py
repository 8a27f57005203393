"""After the mask is fixed: update the surviving weights (OBS update, masked fine-tuning by
distillation); the RECOVERY_LENGTHS registry is the one place a new length is added."""
