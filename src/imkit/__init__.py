"""imkit: instant-messaging servers on Twisted."""
