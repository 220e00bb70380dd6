from twisted.application.service import ServiceMaker

imkit = ServiceMaker("imkit", "imkit.server.tap", "An instant-messaging server (TLS, exactly-once delivery).", "imkit")
