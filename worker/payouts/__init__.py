"""Payout reconciliation (rule 13): every line of a Stripe payout matched to the ledger.

``payouts_ctx(settings)`` runs it in ``recon worker`` (with the periodic drift check of rule 14);
``recon payouts`` runs it on demand. Modules: ``lines`` (the verdicts, pure), ``store`` (the
statements), ``reconciler`` (the API reads and the loop), ``service`` (the worker's context).
"""

from worker.payouts.service import payouts_ctx

__all__ = ["payouts_ctx"]
