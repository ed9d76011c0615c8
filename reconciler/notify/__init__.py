"""Notifications: the daemon tells its owner when something needs attention.

``rules`` decides (pure: which events notify, de-duplication, rate limit, the words); ``send`` does the
I/O (apprise, a bounded queue and a sender thread per notifier, with retries); ``service`` ties them to
the status store for the daemon. Imports nothing itself, so importing ``notify.rules`` loads no apprise.
"""
