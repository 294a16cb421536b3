"""The client side: one client's local work without Flower (``client``) and the ClientApp that
translates engine messages to it (``client_app``)."""
