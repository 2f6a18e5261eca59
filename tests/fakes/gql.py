"""What both fake GraphQL servers share: a document checked against a schema once per process."""
import threading

from graphql import parse, validate
from graphql.error import GraphQLSyntaxError
from graphql.validation import NoDeprecatedCustomRule


class CheckedDocuments:
    """(document | None, syntax error | None, validation errors, deprecation messages) per query text,
    cached: clients send the same few documents over and over, and validating one against a big schema
    costs milliseconds. `get_schema` builds the schema (once, on first use)."""

    def __init__(self, get_schema, limit=500):
        self.get_schema, self.limit = get_schema, limit
        self._lock = threading.Lock()
        self._docs = {}

    def __call__(self, query):
        with self._lock:
            if query in self._docs:
                return self._docs[query]
        try:
            doc = parse(query)
        except GraphQLSyntaxError as e:
            result = (None, e, [], [])
        else:
            schema = self.get_schema()
            errors = validate(schema, doc)
            deprecated = [] if errors else [e.message for e in validate(schema, doc, [NoDeprecatedCustomRule])]
            result = (doc, None, errors, deprecated)
        with self._lock:
            if len(self._docs) > self.limit:
                self._docs.clear()
            self._docs[query] = result
        return result
