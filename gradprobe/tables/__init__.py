"""Tables: the schema of every table (columns, dtypes, vocabularies), the store capture appends plain
records to, and the vectorised builders and joins that turn records into pandas frames. Never torch."""
