"""Fine-tuning: LoRA adapters trained on kt-core models (``kt sft``)."""
