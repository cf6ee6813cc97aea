"""Tables the tests write to."""

from __future__ import annotations

from sqlalchemy import ForeignKey, String, literal_column
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)


class Parent(Base):
    __tablename__ = "parents"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


class Child(Base):
    """A child whose foreign key is checked only at COMMIT, so that COMMIT itself can fail."""

    __tablename__ = "children"

    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(
        ForeignKey("parents.id", deferrable=True, initially="DEFERRED")
    )


class Owner(Base):
    """An owner whose ``revision`` the database computes on UPDATE, with lazy-loaded pets."""

    __tablename__ = "owners"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    revision: Mapped[int] = mapped_column(default=1, onupdate=literal_column("revision") + 1)
    pets: Mapped[list[Pet]] = relationship(order_by="Pet.id", lazy="select")


class Pet(Base):
    __tablename__ = "pets"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"))
    name: Mapped[str] = mapped_column(String(100))
