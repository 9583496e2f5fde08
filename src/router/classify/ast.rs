//! Judging a statement from sqlparser's syntax tree: the classifier's fallback when
//! the lexical pass is unsure, and the differential oracle for tests and fuzzing.
//!
//! The walk covers the expressions and clauses PostgreSQL queries use. Anything else
//! it meets (another dialect's clause, an expression form it does not walk) makes the
//! judgement `opaque`: the classifier then sends the text to the primary, and the
//! oracle gives no opinion.

use sqlparser::ast::{
    CopySource, CopyTarget, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments,
    GroupByExpr, Join, JoinConstraint, JoinOperator, LimitClause, NamedWindowExpr, ObjectName,
    ObjectNamePart, OrderByExpr, OrderByKind, Query, Select, SelectItem, Set, SetExpr, Statement,
    TableFactor, TableWithJoins, TransactionAccessMode, TransactionMode, WindowSpec, WindowType,
};

use super::lists::{self, FunctionKind, Lists};
use super::Reason;

/// What the syntax tree says about a list of statements.
#[derive(Debug, Default)]
pub(super) struct Judgement {
    pub(super) primary: Option<Reason>,
    pub(super) session_state: bool,
    /// Called functions the lists do not know.
    pub(super) functions: Vec<Box<str>>,
    /// The walk met something it does not understand.
    pub(super) opaque: bool,
}

pub(super) fn judge(statements: &[Statement], lists: &Lists) -> Judgement {
    let mut walk = Walk {
        lists,
        out: Judgement::default(),
    };
    // Some(read_only) while inside a BEGIN.
    let mut begin: Option<bool> = None;
    for statement in statements {
        match statement {
            Statement::StartTransaction {
                modes, statements, ..
            } => {
                walk.close(&mut begin);
                walk.out.opaque |= !statements.is_empty();
                begin = Some(access_mode(modes) == Some(true));
            }
            Statement::Set(Set::SetTransaction { modes, session, .. }) => {
                if *session {
                    walk.session(true);
                } else if let (Some(open), Some(read_only)) = (begin.as_mut(), access_mode(modes)) {
                    *open = read_only;
                }
            }
            Statement::Commit { .. }
            | Statement::Rollback {
                savepoint: None, ..
            } => walk.close(&mut begin),
            other => walk.statement(other),
        }
    }
    walk.close(&mut begin);
    walk.out
}

fn access_mode(modes: &[TransactionMode]) -> Option<bool> {
    modes.iter().rev().find_map(|mode| match mode {
        TransactionMode::AccessMode(TransactionAccessMode::ReadOnly) => Some(true),
        TransactionMode::AccessMode(TransactionAccessMode::ReadWrite) => Some(false),
        TransactionMode::IsolationLevel(_) => None,
    })
}

struct Walk<'l> {
    lists: &'l Lists,
    out: Judgement,
}

impl Walk<'_> {
    fn primary(&mut self, reason: Reason) {
        self.out.primary.get_or_insert(reason);
    }

    fn session(&mut self, session_state: bool) {
        self.primary(Reason::SessionState);
        self.out.session_state |= session_state;
    }

    fn close(&mut self, begin: &mut Option<bool>) {
        if begin.take() == Some(false) {
            self.primary(Reason::Transaction);
        }
    }

    fn statement(&mut self, statement: &Statement) {
        match statement {
            Statement::Query(query) => self.query(query),
            Statement::Explain {
                analyze,
                statement,
                options,
                ..
            } => {
                let analyze_option = options.iter().flatten().any(|o| {
                    let name = o.name.value.to_ascii_lowercase();
                    name == "analyze" || name == "analyse"
                });
                if *analyze || analyze_option {
                    self.statement(statement);
                }
            }
            Statement::Copy {
                source, to, target, ..
            } => match (source, to, target) {
                (CopySource::Query(query), true, CopyTarget::Stdout) => self.query(query),
                (CopySource::Table { .. }, true, CopyTarget::Stdout) => {}
                _ => self.primary(Reason::Write),
            },
            Statement::Set(Set::SingleAssignment {
                scope: Some(sqlparser::ast::ContextModifier::Local),
                ..
            })
            | Statement::Set(Set::SetTimeZone { local: true, .. })
            | Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. } => {}
            Statement::Set(_) => self.session(true),
            Statement::ShowFunctions { .. }
            | Statement::ShowVariable { .. }
            | Statement::ShowStatus { .. }
            | Statement::ShowVariables { .. }
            | Statement::ShowCreate { .. }
            | Statement::ShowColumns { .. }
            | Statement::ShowCatalogs { .. }
            | Statement::ShowDatabases { .. }
            | Statement::ShowProcessList { .. }
            | Statement::ShowSchemas { .. }
            | Statement::ShowCharset(_)
            | Statement::ShowObjects(_)
            | Statement::ShowTables { .. }
            | Statement::ShowViews { .. }
            | Statement::ShowCollation { .. }
            // `EXPLAIN name` (another dialect's DESCRIBE) only reads the catalog.
            | Statement::ExplainTable { .. } => {}
            _ => self.primary(Reason::Write),
        }
    }

    fn query(&mut self, query: &Query) {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.query(&cte.query);
            }
        }
        self.set_expr(&query.body);
        if let Some(order_by) = &query.order_by {
            if let OrderByKind::Expressions(exprs) = &order_by.kind {
                self.order_by(exprs);
            }
        }
        match &query.limit_clause {
            Some(LimitClause::LimitOffset {
                limit,
                offset,
                limit_by,
            }) => {
                self.exprs(limit.iter().chain(offset.iter().map(|o| &o.value)));
                self.exprs(limit_by);
            }
            Some(LimitClause::OffsetCommaLimit { offset, limit }) => {
                self.exprs([offset, limit]);
            }
            None => {}
        }
        if let Some(fetch) = &query.fetch {
            self.exprs(&fetch.quantity);
        }
        if !query.locks.is_empty() {
            self.primary(Reason::Write);
        }
        self.out.opaque |= query.for_clause.is_some()
            || query.settings.is_some()
            || query.format_clause.is_some()
            || !query.pipe_operators.is_empty();
    }

    fn set_expr(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Select(select) => self.select(select),
            SetExpr::Query(query) => self.query(query),
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left);
                self.set_expr(right);
            }
            SetExpr::Values(values) => {
                for row in &values.rows {
                    self.exprs(&row.content);
                }
            }
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => {
                self.primary(Reason::Write)
            }
            SetExpr::Table(_) => {}
        }
    }

    fn select(&mut self, select: &Select) {
        if select.into.is_some() {
            self.primary(Reason::Write);
        }
        if let Some(sqlparser::ast::Distinct::On(exprs)) = &select.distinct {
            self.exprs(exprs);
        }
        for item in &select.projection {
            match item {
                SelectItem::UnnamedExpr(expr)
                | SelectItem::ExprWithAlias { expr, .. }
                | SelectItem::ExprWithAliases { expr, .. } => self.expr(expr),
                SelectItem::QualifiedWildcard(..) | SelectItem::Wildcard(_) => {}
            }
        }
        for from in &select.from {
            self.table_with_joins(from);
        }
        self.exprs(&select.selection);
        if let GroupByExpr::Expressions(exprs, _) = &select.group_by {
            self.exprs(exprs);
        }
        self.exprs(&select.having);
        for window in &select.named_window {
            if let NamedWindowExpr::WindowSpec(spec) = &window.1 {
                self.window(spec);
            }
        }
        self.out.opaque |= select.top.is_some()
            || select.select_modifiers.is_some()
            || !select.lateral_views.is_empty()
            || select.prewhere.is_some()
            || !select.connect_by.is_empty()
            || !select.cluster_by.is_empty()
            || !select.distribute_by.is_empty()
            || !select.sort_by.is_empty()
            || select.qualify.is_some();
    }

    fn table_with_joins(&mut self, from: &TableWithJoins) {
        self.table_factor(&from.relation);
        for Join {
            relation,
            join_operator,
            ..
        } in &from.joins
        {
            self.table_factor(relation);
            match join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c)
                | JoinOperator::CrossJoin(c) => {
                    if let JoinConstraint::On(expr) = c {
                        self.expr(expr);
                    }
                }
                _ => self.out.opaque = true,
            }
        }
    }

    fn table_factor(&mut self, factor: &TableFactor) {
        match factor {
            TableFactor::Table { name, args, .. } => {
                if let Some(args) = args {
                    self.call(name);
                    self.args(&args.args);
                }
            }
            TableFactor::Derived { subquery, .. } => self.query(subquery),
            TableFactor::TableFunction { expr, .. } => self.expr(expr),
            TableFactor::Function { name, args, .. } => {
                self.call(name);
                self.args(args);
            }
            TableFactor::UNNEST { array_exprs, .. } => self.exprs(array_exprs),
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => self.table_with_joins(table_with_joins),
            _ => self.out.opaque = true,
        }
    }

    fn exprs<'e>(&mut self, exprs: impl IntoIterator<Item = &'e Expr>) {
        for expr in exprs {
            self.expr(expr);
        }
    }

    fn order_by(&mut self, items: &[OrderByExpr]) {
        self.exprs(items.iter().map(|o| &o.expr));
    }

    fn window(&mut self, spec: &WindowSpec) {
        self.exprs(&spec.partition_by);
        self.order_by(&spec.order_by);
    }

    fn args(&mut self, args: &[FunctionArg]) {
        for arg in args {
            let (FunctionArg::Named { arg, .. }
            | FunctionArg::ExprNamed { arg, .. }
            | FunctionArg::Unnamed(arg)) = arg;
            if let FunctionArgExpr::Expr(expr) = arg {
                self.expr(expr);
            }
        }
    }

    /// A call of the function `name` (its last part, folded as PostgreSQL does).
    fn call(&mut self, name: &ObjectName) {
        let Some(ObjectNamePart::Identifier(ident)) = name.0.last() else {
            self.out.opaque = true;
            return;
        };
        let folded = match ident.quote_style {
            None => ident.value.to_ascii_lowercase(),
            Some(_) => ident.value.clone(),
        };
        // sqlparser parses some of PostgreSQL's keyword forms (COALESCE, GREATEST,
        // ROW) as calls.
        if ident.quote_style.is_none() && lists::contains(lists::PAREN_KEYWORDS, folded.as_bytes())
        {
            return;
        }
        match self.lists.kind(folded.as_bytes()) {
            FunctionKind::SessionLock | FunctionKind::SessionState(_) => self.session(true),
            FunctionKind::Unlock | FunctionKind::Write => self.primary(Reason::Function),
            FunctionKind::Read => {}
            FunctionKind::Unknown => {
                if !self.out.functions.iter().any(|f| **f == *folded) {
                    self.out.functions.push(folded.into());
                }
            }
        }
    }

    fn function(&mut self, function: &Function) {
        match &function.args {
            // CURRENT_DATE, CURRENT_USER and the like: keywords, not calls.
            FunctionArguments::None => return,
            FunctionArguments::Subquery(query) => self.query(query),
            FunctionArguments::List(list) => {
                self.args(&list.args);
                for clause in &list.clauses {
                    match clause {
                        sqlparser::ast::FunctionArgumentClause::OrderBy(items) => {
                            self.order_by(items)
                        }
                        sqlparser::ast::FunctionArgumentClause::Where(expr)
                        | sqlparser::ast::FunctionArgumentClause::Limit(expr) => self.expr(expr),
                        _ => {}
                    }
                }
            }
        }
        self.call(&function.name);
        self.order_by(&function.within_group);
        if let Some(filter) = &function.filter {
            self.expr(filter);
        }
        if let Some(WindowType::WindowSpec(spec)) = &function.over {
            self.window(spec);
        }
    }

    fn expr(&mut self, expr: &Expr) {
        match expr {
            Expr::Identifier(_)
            | Expr::CompoundIdentifier(_)
            | Expr::Value(_)
            | Expr::TypedString(_)
            | Expr::Wildcard(_)
            | Expr::QualifiedWildcard(..) => {}
            Expr::IsFalse(e)
            | Expr::IsNotFalse(e)
            | Expr::IsTrue(e)
            | Expr::IsNotTrue(e)
            | Expr::IsNull(e)
            | Expr::IsNotNull(e)
            | Expr::IsUnknown(e)
            | Expr::IsNotUnknown(e)
            | Expr::Nested(e)
            | Expr::UnaryOp { expr: e, .. }
            | Expr::Cast { expr: e, .. }
            | Expr::Extract { expr: e, .. }
            | Expr::Ceil { expr: e, .. }
            | Expr::Floor { expr: e, .. }
            | Expr::Collate { expr: e, .. }
            | Expr::IsNormalized { expr: e, .. }
            | Expr::Named { expr: e, .. } => self.expr(e),
            Expr::IsDistinctFrom(a, b)
            | Expr::IsNotDistinctFrom(a, b)
            | Expr::BinaryOp {
                left: a, right: b, ..
            }
            | Expr::AnyOp {
                left: a, right: b, ..
            }
            | Expr::AllOp {
                left: a, right: b, ..
            }
            | Expr::AtTimeZone {
                timestamp: a,
                time_zone: b,
            }
            | Expr::Position { expr: a, r#in: b } => self.exprs([&**a, &**b]),
            Expr::Like {
                expr,
                pattern,
                escape_char,
                ..
            }
            | Expr::ILike {
                expr,
                pattern,
                escape_char,
                ..
            }
            | Expr::SimilarTo {
                expr,
                pattern,
                escape_char,
                ..
            } => {
                self.exprs([&**expr, &**pattern]);
                self.exprs(escape_char.iter().map(|e| &**e));
            }
            Expr::InList { expr, list, .. } => {
                self.expr(expr);
                self.exprs(list);
            }
            Expr::InSubquery { expr, subquery, .. } => {
                self.expr(expr);
                self.query(subquery);
            }
            Expr::Between {
                expr, low, high, ..
            } => self.exprs([&**expr, &**low, &**high]),
            _ => self.composite_expr(expr),
        }
    }

    /// The expressions [`Self::expr`] leaves to this: string functions, calls, CASE,
    /// subqueries, and containers. Anything unknown makes the statement opaque.
    fn composite_expr(&mut self, expr: &Expr) {
        match expr {
            Expr::Substring {
                expr,
                substring_from,
                substring_for,
                ..
            } => {
                self.expr(expr);
                self.exprs(substring_from.iter().chain(substring_for).map(|e| &**e));
            }
            Expr::Trim {
                expr,
                trim_what,
                trim_characters,
                ..
            } => {
                self.expr(expr);
                self.exprs(trim_what.iter().map(|e| &**e));
                self.exprs(trim_characters.iter().flatten());
            }
            Expr::Overlay {
                expr,
                overlay_what,
                overlay_from,
                overlay_for,
            } => {
                self.exprs([&**expr, &**overlay_what, &**overlay_from]);
                self.exprs(overlay_for.iter().map(|e| &**e));
            }
            Expr::Function(function) => self.function(function),
            Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                self.exprs(operand.iter().chain(else_result).map(|e| &**e));
                for when in conditions {
                    self.exprs([&when.condition, &when.result]);
                }
            }
            Expr::Exists { subquery, .. } | Expr::Subquery(subquery) => self.query(subquery),
            Expr::GroupingSets(sets) | Expr::Cube(sets) | Expr::Rollup(sets) => {
                self.exprs(sets.iter().flatten())
            }
            Expr::Tuple(exprs) => self.exprs(exprs),
            Expr::Array(array) => self.exprs(&array.elem),
            Expr::Interval(interval) => self.expr(&interval.value),
            _ => self.out.opaque = true,
        }
    }
}
