"""Vector indexes derived from the store, and the retriever that uses them."""
