"""Command-line tools around the trainer (score, plan, validate, bench); nothing the trainer runs imports them."""
