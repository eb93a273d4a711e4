"""The ops console (CONTRACT 4c): server-rendered pages under ``/console`` on RECON_API_PORT.

session.py  sign-in with a back-office token: a signed, expiring cookie; the forms' CSRF token
reads.py    what the pages show: finance views, dead letters, queue depths
render.py   Jinja2 (autoescaped), money, UTC times with their age, badges
pages.py    the routes; every action goes through what the API and the commands use:
            refunds and rejects through service.BackOffice (rule 11), resolve, retry and
            replay through worker.workbench
"""
