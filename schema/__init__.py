"""SQL migrations, applied in file-name order by ``recon migrate``."""
