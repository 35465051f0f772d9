"""Fine-tuning: the torch stack lives here and in nothing the extract image imports."""
