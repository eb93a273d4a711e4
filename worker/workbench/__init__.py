"""What an operator does to the worker's leftovers, from any front: the ``recon exceptions`` and
``recon dead-letters`` commands (worker/ops) and the ops console (worker/backoffice/console) call the
same functions here, so a resolve, a retry or a replay means one thing whoever asks.

    exceptions.py    list, resolve with a note, retry the event behind an unmatched_charge or
                     refund_mismatch (inbox reset committed before the publish)
    dead_letters.py  list the dead letters not yet replayed, replay them as fresh deliveries

Each function takes a connection (or settings, where it publishes) and returns what happened;
printing and exit codes belong to the commands, pages to the console.
"""
