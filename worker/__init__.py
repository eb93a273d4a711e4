"""stripe-recon: receiver, consumer runtime, settings, logging and CLI."""
