"""One APIRouter per resource; nightowl.api.app includes them all."""
