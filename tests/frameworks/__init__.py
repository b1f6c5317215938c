"""Host applications in every supported framework, and the protocol checks run through them."""
